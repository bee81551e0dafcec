package rafs

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
	"strings"
)

// On-disk layout of a RAFS v6 bootstrap: an EROFS image whose data lives in
// external blobs. Byte offsets and field meanings follow the spec in
// shared/docs/rafsv6-format.md (section numbers in comments). Every integer
// is little-endian. Each structure has exactly one Decode and one Encode so
// that the reader and the writer cannot drift apart.

var le = binary.LittleEndian

// Fixed positions and sizes (§1).
const (
	SuperblockOffset    = 1024 // EROFS superblock
	SuperblockSize      = 128
	ExtSuperblockOffset = 1152 // RAFS v6 extended superblock
	ExtSuperblockSize   = 256
	DeviceSlotOffset    = 1408 // = DevtSlotOff * DeviceSlotSize
	DeviceSlotSize      = 128
	DevtSlotOff         = DeviceSlotOffset / DeviceSlotSize // 11
	BlobEntrySize       = 256
	ChunkInfoSize       = 80 // bootstrap chunk table entry (v5 chunk-info layout)
	InodeSlotSize       = 32 // nids count 32-byte slots from meta_blkaddr
	CompactInodeSize    = 32
	ExtendedInodeSize   = 64
	DirentSize          = 12
	ChunkIndexSize      = 8
	XattrHeaderSize     = 12
	XattrEntrySize      = 4
	BlobMetaHeaderSize  = 4096
	CIv1EntrySize       = 16
	CIv2EntrySize       = 24

	// MetaAlign is the alignment nydus requires of bootstrap sizes and of the
	// blob and chunk tables, whatever the EROFS block size.
	MetaAlign = 4096

	// MaxBlobs is the builder's cap: the kernel masks chunk-index device ids
	// with roundup_pow2(n+1)-1, which must stay within the low byte.
	MaxBlobs = 254
	// MaxCIIndex bounds the 24-bit chunk-info index of a chunk index.
	MaxCIIndex = 1<<24 - 1
)

// EROFS superblock constants (§2).
const (
	ErofsMagic = 0xE0F5E1E2

	FeatureCompatRafsV6 = 0x4000_0000

	FeatureIncompatChunkedFile = 0x4
	FeatureIncompatDeviceTable = 0x8
	// FeatureIncompatRafsV6 is the exact incompat set RAFS v6 requires.
	FeatureIncompatRafsV6 = FeatureIncompatChunkedFile | FeatureIncompatDeviceTable

	BlockSizeBitsDefault = 12 // 4 KiB, ordinary RAFS
	BlockSizeBitsTarfs   = 9  // 512 B, tarfs
)

// Extended superblock flags (§3).
const (
	FlagCompressionNone    = 0x1
	FlagCompressionLZ4     = 0x2
	FlagHashBlake3         = 0x4
	FlagHashSHA256         = 0x8
	FlagExplicitUIDGID     = 0x10
	FlagHasXattr           = 0x20
	FlagCompressionGzip    = 0x40
	FlagCompressionZstd    = 0x80
	FlagInlinedChunkDigest = 0x100
	FlagTarfsMode          = 0x200
	FlagEncryptionNone     = 0x0100_0000
	FlagEncryptionAES128   = 0x0200_0000

	flagCompressionMask = FlagCompressionNone | FlagCompressionLZ4 | FlagCompressionGzip | FlagCompressionZstd
	flagHashMask        = FlagHashBlake3 | FlagHashSHA256
)

// Compressor is the blob-table compression enum (§5).
type Compressor uint32

const (
	CompressNone     Compressor = 0
	CompressLZ4Block Compressor = 1
	CompressGzip     Compressor = 2
	CompressZstd     Compressor = 3
)

func (c Compressor) String() string {
	switch c {
	case CompressNone:
		return "none"
	case CompressLZ4Block:
		return "lz4_block"
	case CompressGzip:
		return "gzip"
	case CompressZstd:
		return "zstd"
	}
	return fmt.Sprintf("compressor(%d)", uint32(c))
}

// ParseCompressor is the inverse of Compressor.String.
func ParseCompressor(s string) (Compressor, error) {
	for c := CompressNone; c <= CompressZstd; c++ {
		if c.String() == s {
			return c, nil
		}
	}
	return 0, fmt.Errorf("rafs: unknown compressor %q (want none, lz4_block, gzip or zstd)", s)
}

// Flag is the extended-superblock flag naming this compressor.
func (c Compressor) Flag() uint64 {
	switch c {
	case CompressNone:
		return FlagCompressionNone
	case CompressLZ4Block:
		return FlagCompressionLZ4
	case CompressGzip:
		return FlagCompressionGzip
	case CompressZstd:
		return FlagCompressionZstd
	}
	return 0
}

// Digester is the blob-table chunk digest enum (§5).
type Digester uint32

const (
	DigestBlake3 Digester = 0
	DigestSHA256 Digester = 1
)

func (d Digester) String() string {
	switch d {
	case DigestBlake3:
		return "blake3"
	case DigestSHA256:
		return "sha256"
	}
	return fmt.Sprintf("digester(%d)", uint32(d))
}

// ParseDigester is the inverse of Digester.String.
func ParseDigester(s string) (Digester, error) {
	switch s {
	case "blake3":
		return DigestBlake3, nil
	case "sha256":
		return DigestSHA256, nil
	}
	return 0, fmt.Errorf("rafs: unknown digester %q (want blake3 or sha256)", s)
}

// Flag is the extended-superblock flag naming this digester.
func (d Digester) Flag() uint64 {
	if d == DigestSHA256 {
		return FlagHashSHA256
	}
	return FlagHashBlake3
}

// Blob features (§5).
const (
	BlobFeatureAligned            = 0x1
	BlobFeatureInlinedFSMeta      = 0x2
	BlobFeatureChunkInfoV2        = 0x4
	BlobFeatureZran               = 0x8
	BlobFeatureSeparate           = 0x10
	BlobFeatureInlinedChunkDigest = 0x20
	BlobFeatureTarfs              = 0x40
	BlobFeatureBatch              = 0x80
	BlobFeatureEncrypted          = 0x100
	BlobFeatureChunkdictGenerated = 0x200
	BlobFeatureSeparatedPrefetch  = 0x400
	BlobFeatureExternal           = 0x800
	BlobFeatureHasTarHeader       = 0x1000_0000
	BlobFeatureHasTOC             = 0x2000_0000
	BlobFeatureCapTarTOC          = 0x4000_0000

	// blobFeatureIncompatUnknown are bits a reader must reject.
	blobFeatureIncompatUnknown = 0xF000 | 0x8000_0000
)

// File type bits of i_mode, as in st_mode.
const (
	ModeTypeMask = 0xF000
	ModeSocket   = 0xC000
	ModeSymlink  = 0xA000
	ModeRegular  = 0x8000
	ModeBlock    = 0x6000
	ModeDir      = 0x4000
	ModeChar     = 0x2000
	ModeFifo     = 0x1000
)

// Inode i_format bits (§6).
const (
	InodeFormatExtended = 0x1
	LayoutFlatPlain     = 0
	LayoutFlatInline    = 2
	LayoutChunkBased    = 4
)

// Chunk-format bits stored in i_u of chunk-based regular files (§8).
const (
	ChunkFormatBlkBitsMask = 0x1F
	ChunkFormatIndexes     = 0x20
	ChunkFormat48Bit       = 0x40
)

// NullBlkAddr marks a hole chunk (never written by RAFS builders).
const NullBlkAddr = 0xFFFF_FFFF

// Directory entry file types (§7).
const (
	FileTypeUnknown = 0
	FileTypeReg     = 1
	FileTypeDir     = 2
	FileTypeChr     = 3
	FileTypeBlk     = 4
	FileTypeFifo    = 5
	FileTypeSock    = 6
	FileTypeSymlink = 7
)

// FileTypeOf is the directory-entry file type (FileType*) of an i_mode.
func FileTypeOf(mode uint32) uint8 {
	switch mode & ModeTypeMask {
	case ModeRegular:
		return FileTypeReg
	case ModeDir:
		return FileTypeDir
	case ModeChar:
		return FileTypeChr
	case ModeBlock:
		return FileTypeBlk
	case ModeFifo:
		return FileTypeFifo
	case ModeSocket:
		return FileTypeSock
	case ModeSymlink:
		return FileTypeSymlink
	}
	return FileTypeUnknown
}

// Xattr name indexes (§9).
const (
	XattrIndexUser            = 1
	XattrIndexPosixACLAccess  = 2
	XattrIndexPosixACLDefault = 3
	XattrIndexTrusted         = 4
	XattrIndexSecurity        = 6
)

// Chunk-info (bootstrap chunk table) flags (§10) and CI v2 flags (§11).
const (
	ChunkFlagCompressed = 0x1
	ChunkFlagEncrypted  = 0x4
	ChunkFlagBatch      = 0x8
	ChunkFlagHasCRC32   = 0x10
)

// Blob meta (chunk-info array) header constants (§11).
const BlobMetaMagic = 0xB10BB10B

// Superblock is the EROFS superblock at byte 1024 (§2).
type Superblock struct {
	Magic           uint32   // magic
	Checksum        uint32   // checksum, 0 for RAFS
	FeatureCompat   uint32   // feature_compat
	BlkSzBits       uint8    // blkszbits
	ExtSlots        uint8    // sb_extslots
	RootNid         uint16   // root_nid
	Inos            uint64   // inos
	BuildTime       uint64   // build_time (mtime of compact inodes)
	BuildTimeNsec   uint32   // build_time_nsec
	Blocks          uint32   // blocks
	MetaBlkAddr     uint32   // meta_blkaddr
	XattrBlkAddr    uint32   // xattr_blkaddr
	UUID            [16]byte // uuid
	VolumeName      [16]byte // volume_name
	FeatureIncompat uint32   // feature_incompat
	U1              uint16   // available_compr_algs / lz4_max_distance
	ExtraDevices    uint16   // extra_devices
	DevtSlotOff     uint16   // devt_slotoff
	Reserved        [38]byte
}

// Decode fills sb from the SuperblockSize bytes of b.
func (sb *Superblock) Decode(b []byte) {
	_ = b[SuperblockSize-1]
	sb.Magic = le.Uint32(b[0:])
	sb.Checksum = le.Uint32(b[4:])
	sb.FeatureCompat = le.Uint32(b[8:])
	sb.BlkSzBits = b[12]
	sb.ExtSlots = b[13]
	sb.RootNid = le.Uint16(b[14:])
	sb.Inos = le.Uint64(b[16:])
	sb.BuildTime = le.Uint64(b[24:])
	sb.BuildTimeNsec = le.Uint32(b[32:])
	sb.Blocks = le.Uint32(b[36:])
	sb.MetaBlkAddr = le.Uint32(b[40:])
	sb.XattrBlkAddr = le.Uint32(b[44:])
	copy(sb.UUID[:], b[48:64])
	copy(sb.VolumeName[:], b[64:80])
	sb.FeatureIncompat = le.Uint32(b[80:])
	sb.U1 = le.Uint16(b[84:])
	sb.ExtraDevices = le.Uint16(b[86:])
	sb.DevtSlotOff = le.Uint16(b[88:])
	copy(sb.Reserved[:], b[90:128])
}

// Encode writes sb into the first SuperblockSize bytes of b.
func (sb *Superblock) Encode(b []byte) {
	_ = b[SuperblockSize-1]
	le.PutUint32(b[0:], sb.Magic)
	le.PutUint32(b[4:], sb.Checksum)
	le.PutUint32(b[8:], sb.FeatureCompat)
	b[12] = sb.BlkSzBits
	b[13] = sb.ExtSlots
	le.PutUint16(b[14:], sb.RootNid)
	le.PutUint64(b[16:], sb.Inos)
	le.PutUint64(b[24:], sb.BuildTime)
	le.PutUint32(b[32:], sb.BuildTimeNsec)
	le.PutUint32(b[36:], sb.Blocks)
	le.PutUint32(b[40:], sb.MetaBlkAddr)
	le.PutUint32(b[44:], sb.XattrBlkAddr)
	copy(b[48:64], sb.UUID[:])
	copy(b[64:80], sb.VolumeName[:])
	le.PutUint32(b[80:], sb.FeatureIncompat)
	le.PutUint16(b[84:], sb.U1)
	le.PutUint16(b[86:], sb.ExtraDevices)
	le.PutUint16(b[88:], sb.DevtSlotOff)
	copy(b[90:128], sb.Reserved[:])
}

// BlockSize is the EROFS block size in bytes.
func (sb *Superblock) BlockSize() uint32 { return 1 << sb.BlkSzBits }

// ExtSuperblock is the RAFS v6 extended superblock at byte 1152 (§3).
type ExtSuperblock struct {
	Flags               uint64 // s_flags
	BlobTableOffset     uint64 // s_blob_table_offset
	BlobTableSize       uint32 // s_blob_table_size
	ChunkSize           uint32 // s_chunk_size
	ChunkTableOffset    uint64 // s_chunk_table_offset
	ChunkTableSize      uint64 // s_chunk_table_size
	PrefetchTableOffset uint64 // s_prefetch_table_offset
	PrefetchTableSize   uint32 // s_prefetch_table_size
	Padding             uint32
	Reserved            [200]byte
}

// Decode fills e from the ExtSuperblockSize bytes of b.
func (e *ExtSuperblock) Decode(b []byte) {
	_ = b[ExtSuperblockSize-1]
	e.Flags = le.Uint64(b[0:])
	e.BlobTableOffset = le.Uint64(b[8:])
	e.BlobTableSize = le.Uint32(b[16:])
	e.ChunkSize = le.Uint32(b[20:])
	e.ChunkTableOffset = le.Uint64(b[24:])
	e.ChunkTableSize = le.Uint64(b[32:])
	e.PrefetchTableOffset = le.Uint64(b[40:])
	e.PrefetchTableSize = le.Uint32(b[48:])
	e.Padding = le.Uint32(b[52:])
	copy(e.Reserved[:], b[56:256])
}

// Encode writes e into the first ExtSuperblockSize bytes of b.
func (e *ExtSuperblock) Encode(b []byte) {
	_ = b[ExtSuperblockSize-1]
	le.PutUint64(b[0:], e.Flags)
	le.PutUint64(b[8:], e.BlobTableOffset)
	le.PutUint32(b[16:], e.BlobTableSize)
	le.PutUint32(b[20:], e.ChunkSize)
	le.PutUint64(b[24:], e.ChunkTableOffset)
	le.PutUint64(b[32:], e.ChunkTableSize)
	le.PutUint64(b[40:], e.PrefetchTableOffset)
	le.PutUint32(b[48:], e.PrefetchTableSize)
	le.PutUint32(b[52:], e.Padding)
	copy(b[56:256], e.Reserved[:])
}

// DeviceSlot is one entry of the device table at byte 1408 (§4). Slot i is
// EROFS device i+1 and describes blob i.
type DeviceSlot struct {
	BlobID        [64]byte // tag: blob id, ASCII
	Blocks        uint32   // blocks: uncompressed_size / block size
	MappedBlkAddr uint32   // mapped_blkaddr: first block in the flat device
	Reserved      [56]byte
}

// Decode fills d from the DeviceSlotSize bytes of b.
func (d *DeviceSlot) Decode(b []byte) {
	_ = b[DeviceSlotSize-1]
	copy(d.BlobID[:], b[0:64])
	d.Blocks = le.Uint32(b[64:])
	d.MappedBlkAddr = le.Uint32(b[68:])
	copy(d.Reserved[:], b[72:128])
}

// Encode writes d into the first DeviceSlotSize bytes of b.
func (d *DeviceSlot) Encode(b []byte) {
	_ = b[DeviceSlotSize-1]
	copy(b[0:64], d.BlobID[:])
	le.PutUint32(b[64:], d.Blocks)
	le.PutUint32(b[68:], d.MappedBlkAddr)
	copy(b[72:128], d.Reserved[:])
}

// BlobEntry is one 256-byte entry of the RAFS blob table (§5).
type BlobEntry struct {
	BlobID             [64]byte // blob id, ASCII, NUL padded
	BlobIndex          uint32
	ChunkSize          uint32
	ChunkCount         uint32
	Compressor         Compressor
	Digester           Digester
	Features           uint32
	CompressedSize     uint64
	UncompressedSize   uint64
	TOCSize            uint32 // blob_toc_size
	CICompressor       Compressor
	CIOffset           uint64
	CICompressedSize   uint64
	CIUncompressedSize uint64
	TOCDigest          [32]byte
	MetaDigest         [32]byte // ZRAN blob meta digest, or cipher key
	MetaSize           uint64   // ZRAN blob meta size, or cipher IV[0:8]
	CipherIVHigh       uint64   // cipher IV[8:16]
	CipherAlgo         uint32
	Reserved           [36]byte
}

// Decode fills e from the BlobEntrySize bytes of b.
func (e *BlobEntry) Decode(b []byte) {
	_ = b[BlobEntrySize-1]
	copy(e.BlobID[:], b[0:64])
	e.BlobIndex = le.Uint32(b[64:])
	e.ChunkSize = le.Uint32(b[68:])
	e.ChunkCount = le.Uint32(b[72:])
	e.Compressor = Compressor(le.Uint32(b[76:]))
	e.Digester = Digester(le.Uint32(b[80:]))
	e.Features = le.Uint32(b[84:])
	e.CompressedSize = le.Uint64(b[88:])
	e.UncompressedSize = le.Uint64(b[96:])
	e.TOCSize = le.Uint32(b[104:])
	e.CICompressor = Compressor(le.Uint32(b[108:]))
	e.CIOffset = le.Uint64(b[112:])
	e.CICompressedSize = le.Uint64(b[120:])
	e.CIUncompressedSize = le.Uint64(b[128:])
	copy(e.TOCDigest[:], b[136:168])
	copy(e.MetaDigest[:], b[168:200])
	e.MetaSize = le.Uint64(b[200:])
	e.CipherIVHigh = le.Uint64(b[208:])
	e.CipherAlgo = le.Uint32(b[216:])
	copy(e.Reserved[:], b[220:256])
}

// Encode writes e into the first BlobEntrySize bytes of b.
func (e *BlobEntry) Encode(b []byte) {
	_ = b[BlobEntrySize-1]
	copy(b[0:64], e.BlobID[:])
	le.PutUint32(b[64:], e.BlobIndex)
	le.PutUint32(b[68:], e.ChunkSize)
	le.PutUint32(b[72:], e.ChunkCount)
	le.PutUint32(b[76:], uint32(e.Compressor))
	le.PutUint32(b[80:], uint32(e.Digester))
	le.PutUint32(b[84:], e.Features)
	le.PutUint64(b[88:], e.CompressedSize)
	le.PutUint64(b[96:], e.UncompressedSize)
	le.PutUint32(b[104:], e.TOCSize)
	le.PutUint32(b[108:], uint32(e.CICompressor))
	le.PutUint64(b[112:], e.CIOffset)
	le.PutUint64(b[120:], e.CICompressedSize)
	le.PutUint64(b[128:], e.CIUncompressedSize)
	copy(b[136:168], e.TOCDigest[:])
	copy(b[168:200], e.MetaDigest[:])
	le.PutUint64(b[200:], e.MetaSize)
	le.PutUint64(b[208:], e.CipherIVHigh)
	le.PutUint32(b[216:], e.CipherAlgo)
	copy(b[220:256], e.Reserved[:])
}

// IsTarfs reports whether the blob is a tarfs blob (§5: TARFS and CAP_TAR_TOC).
func (e *BlobEntry) IsTarfs() bool {
	return e.Features&BlobFeatureTarfs != 0 && e.Features&BlobFeatureCapTarTOC != 0
}

// Inode is an EROFS inode in either on-disk form (§6): compact (32 bytes)
// when Format has no InodeFormatExtended bit, extended (64 bytes) otherwise.
// Fields a compact inode lacks decode as zero, and its Mtime is the delta
// the kernel adds to the superblock's build time; Encode refuses values a
// compact inode cannot hold.
type Inode struct {
	Format     uint16 // i_format: bit 0 extended, bits 1-3 data layout
	XattrCount uint16 // i_xattr_icount
	Mode       uint16 // i_mode
	Nlink      uint32 // i_nlink (u16 in compact inodes)
	Size       uint64 // i_size (u32 in compact inodes)
	U          uint32 // i_u: raw block address, chunk format or rdev
	Ino        uint32 // i_ino
	UID        uint32 // i_uid (u16 in compact inodes)
	GID        uint32 // i_gid (u16 in compact inodes)
	Mtime      uint64 // i_mtime; in compact inodes a 32-bit delta from the superblock's build time
	MtimeNsec  uint32 // i_mtime_nsec (extended only; compact inodes use the build time's)
}

// Extended reports whether the inode uses the 64-byte form.
func (ino *Inode) Extended() bool { return ino.Format&InodeFormatExtended != 0 }

// Layout is the data layout (bits 1-3 of i_format).
func (ino *Inode) Layout() uint16 { return ino.Format >> 1 & 0x7 }

// SizeOnDisk is the inode's on-disk size, 32 or 64 bytes.
func (ino *Inode) SizeOnDisk() int {
	if ino.Extended() {
		return ExtendedInodeSize
	}
	return CompactInodeSize
}

// XattrSize is the size of the inline xattr area following the inode.
func (ino *Inode) XattrSize() int { return XattrAreaSize(ino.XattrCount) }

// XattrAreaSize converts i_xattr_icount to bytes (§9).
func XattrAreaSize(icount uint16) int {
	if icount == 0 {
		return 0
	}
	return XattrHeaderSize + XattrEntrySize*(int(icount)-1)
}

// DecodeInode decodes the inode at the start of b, which must hold at least
// CompactInodeSize bytes, and ExtendedInodeSize when the format says so.
func DecodeInode(b []byte) (Inode, error) {
	var ino Inode
	if len(b) < CompactInodeSize {
		return ino, fmt.Errorf("inode truncated: %d bytes", len(b))
	}
	ino.Format = le.Uint16(b[0:])
	ino.XattrCount = le.Uint16(b[2:])
	ino.Mode = le.Uint16(b[4:])
	if !ino.Extended() {
		ino.Nlink = uint32(le.Uint16(b[6:]))
		ino.Size = uint64(le.Uint32(b[8:]))
		ino.Mtime = uint64(le.Uint32(b[12:]))
		ino.U = le.Uint32(b[16:])
		ino.Ino = le.Uint32(b[20:])
		ino.UID = uint32(le.Uint16(b[24:]))
		ino.GID = uint32(le.Uint16(b[26:]))
		return ino, nil
	}
	if len(b) < ExtendedInodeSize {
		return ino, fmt.Errorf("extended inode truncated: %d bytes", len(b))
	}
	ino.Size = le.Uint64(b[8:])
	ino.U = le.Uint32(b[16:])
	ino.Ino = le.Uint32(b[20:])
	ino.UID = le.Uint32(b[24:])
	ino.GID = le.Uint32(b[28:])
	ino.Mtime = le.Uint64(b[32:])
	ino.MtimeNsec = le.Uint32(b[40:])
	ino.Nlink = le.Uint32(b[44:])
	return ino, nil
}

// Encode writes the inode into b (SizeOnDisk bytes), zeroing reserved
// fields. It fails if a compact inode cannot hold a value.
func (ino *Inode) Encode(b []byte) error {
	n := ino.SizeOnDisk()
	if len(b) < n {
		return fmt.Errorf("inode buffer too small: %d < %d", len(b), n)
	}
	clear(b[:n])
	le.PutUint16(b[0:], ino.Format)
	le.PutUint16(b[2:], ino.XattrCount)
	le.PutUint16(b[4:], ino.Mode)
	le.PutUint32(b[16:], ino.U)
	le.PutUint32(b[20:], ino.Ino)
	if !ino.Extended() {
		if ino.Nlink > 0xFFFF || ino.Size > 0xFFFF_FFFF || ino.UID > 0xFFFF || ino.GID > 0xFFFF || ino.Mtime > 0xFFFF_FFFF {
			return fmt.Errorf("compact inode cannot hold nlink %d, size %d, uid %d, gid %d, mtime delta %d",
				ino.Nlink, ino.Size, ino.UID, ino.GID, ino.Mtime)
		}
		le.PutUint16(b[6:], uint16(ino.Nlink))
		le.PutUint32(b[8:], uint32(ino.Size))
		le.PutUint32(b[12:], uint32(ino.Mtime))
		le.PutUint16(b[24:], uint16(ino.UID))
		le.PutUint16(b[26:], uint16(ino.GID))
		return nil
	}
	le.PutUint64(b[8:], ino.Size)
	le.PutUint32(b[24:], ino.UID)
	le.PutUint32(b[28:], ino.GID)
	le.PutUint64(b[32:], ino.Mtime)
	le.PutUint32(b[40:], ino.MtimeNsec)
	le.PutUint32(b[44:], ino.Nlink)
	return nil
}

// Dirent is a 12-byte directory entry (§7); names follow the entry array.
type Dirent struct {
	Nid      uint64
	NameOff  uint16
	FileType uint8
	Reserved uint8
}

// Decode fills d from the DirentSize bytes of b.
func (d *Dirent) Decode(b []byte) {
	_ = b[DirentSize-1]
	d.Nid = le.Uint64(b[0:])
	d.NameOff = le.Uint16(b[8:])
	d.FileType = b[10]
	d.Reserved = b[11]
}

// Encode writes d into the first DirentSize bytes of b.
func (d *Dirent) Encode(b []byte) {
	_ = b[DirentSize-1]
	le.PutUint64(b[0:], d.Nid)
	le.PutUint16(b[8:], d.NameOff)
	b[10] = d.FileType
	b[11] = d.Reserved
}

// ChunkIndex is an 8-byte EROFS chunk index as RAFS uses it (§8): the
// device id's low byte is blob index + 1, the 24-bit chunk-info index is
// split over the advise field and the device id's high byte, and BlkAddr is
// relative to the blob's uncompressed space, in EROFS blocks.
type ChunkIndex struct {
	Advise   uint16 // bits 0-15 of the chunk-info index
	DeviceID uint16 // low byte: blob index + 1; high byte: ci index bits 16-23
	BlkAddr  uint32 // startblk_lo
}

// Decode fills c from the ChunkIndexSize bytes of b.
func (c *ChunkIndex) Decode(b []byte) {
	_ = b[ChunkIndexSize-1]
	c.Advise = le.Uint16(b[0:])
	c.DeviceID = le.Uint16(b[2:])
	c.BlkAddr = le.Uint32(b[4:])
}

// Encode writes c into the first ChunkIndexSize bytes of b.
func (c *ChunkIndex) Encode(b []byte) {
	_ = b[ChunkIndexSize-1]
	le.PutUint16(b[0:], c.Advise)
	le.PutUint16(b[2:], c.DeviceID)
	le.PutUint32(b[4:], c.BlkAddr)
}

// NewChunkIndex packs a blob index, a chunk-info index and a block address.
func NewChunkIndex(blobIndex int, ciIndex uint32, blkAddr uint32) ChunkIndex {
	return ChunkIndex{
		Advise:   uint16(ciIndex),
		DeviceID: uint16(blobIndex+1)&0xFF | uint16(ciIndex>>16&0xFF)<<8,
		BlkAddr:  blkAddr,
	}
}

// BlobIndex is the index into the blob table, or -1 for device 0.
func (c *ChunkIndex) BlobIndex() int { return int(c.DeviceID&0xFF) - 1 }

// CIIndex is the chunk's index in its blob's chunk-info array.
func (c *ChunkIndex) CIIndex() uint32 { return uint32(c.Advise) | uint32(c.DeviceID>>8)<<16 }

// ChunkInfo is an 80-byte entry of the bootstrap chunk table (§10).
type ChunkInfo struct {
	Digest             [32]byte
	BlobIndex          uint32
	Flags              uint32
	CompressedSize     uint32
	UncompressedSize   uint32
	CompressedOffset   uint64
	UncompressedOffset uint64
	FileOffset         uint64
	Index              uint32 // chunk-info index within the blob
	CRC32              uint32
}

// Decode fills c from the ChunkInfoSize bytes of b.
func (c *ChunkInfo) Decode(b []byte) {
	_ = b[ChunkInfoSize-1]
	copy(c.Digest[:], b[0:32])
	c.BlobIndex = le.Uint32(b[32:])
	c.Flags = le.Uint32(b[36:])
	c.CompressedSize = le.Uint32(b[40:])
	c.UncompressedSize = le.Uint32(b[44:])
	c.CompressedOffset = le.Uint64(b[48:])
	c.UncompressedOffset = le.Uint64(b[56:])
	c.FileOffset = le.Uint64(b[64:])
	c.Index = le.Uint32(b[72:])
	c.CRC32 = le.Uint32(b[76:])
}

// Encode writes c into the first ChunkInfoSize bytes of b.
func (c *ChunkInfo) Encode(b []byte) {
	_ = b[ChunkInfoSize-1]
	copy(b[0:32], c.Digest[:])
	le.PutUint32(b[32:], c.BlobIndex)
	le.PutUint32(b[36:], c.Flags)
	le.PutUint32(b[40:], c.CompressedSize)
	le.PutUint32(b[44:], c.UncompressedSize)
	le.PutUint64(b[48:], c.CompressedOffset)
	le.PutUint64(b[56:], c.UncompressedOffset)
	le.PutUint64(b[64:], c.FileOffset)
	le.PutUint32(b[72:], c.Index)
	le.PutUint32(b[76:], c.CRC32)
}

// XattrEntry is the 4-byte header of one inline xattr (§9); the name suffix
// and the value follow, the whole padded to a multiple of 4.
type XattrEntry struct {
	NameLen   uint8
	NameIndex uint8
	ValueSize uint16
}

// Decode fills x from the XattrEntrySize bytes of b.
func (x *XattrEntry) Decode(b []byte) {
	_ = b[XattrEntrySize-1]
	x.NameLen = b[0]
	x.NameIndex = b[1]
	x.ValueSize = le.Uint16(b[2:])
}

// Encode writes x into the first XattrEntrySize bytes of b.
func (x *XattrEntry) Encode(b []byte) {
	_ = b[XattrEntrySize-1]
	b[0] = x.NameLen
	b[1] = x.NameIndex
	le.PutUint16(b[2:], x.ValueSize)
}

// xattrPrefixes are the name prefixes RAFS can store, by name index. The
// POSIX ACL indexes stand for a whole name with an empty suffix.
var xattrPrefixes = [...]struct {
	index  uint8
	prefix string
	whole  bool
}{
	{XattrIndexUser, "user.", false},
	{XattrIndexPosixACLAccess, "system.posix_acl_access", true},
	{XattrIndexPosixACLDefault, "system.posix_acl_default", true},
	{XattrIndexTrusted, "trusted.", false},
	{XattrIndexSecurity, "security.", false},
}

// XattrPrefix returns the name prefix of an xattr name index.
func XattrPrefix(index uint8) (string, bool) {
	for _, p := range xattrPrefixes {
		if p.index == index {
			return p.prefix, true
		}
	}
	return "", false
}

// XattrIndex splits a full xattr name into its name index and the suffix
// stored on disk; ok is false for names RAFS cannot represent.
func XattrIndex(name string) (index uint8, suffix string, ok bool) {
	for _, p := range xattrPrefixes {
		if p.whole {
			if name == p.prefix {
				return p.index, "", true
			}
		} else if s, found := strings.CutPrefix(name, p.prefix); found && s != "" {
			return p.index, s, true
		}
	}
	return 0, "", false
}

// BlobMetaHeader is the 4096-byte header that follows a blob's chunk-info
// array (§11).
type BlobMetaHeader struct {
	Magic              uint32
	Features           uint32
	CICompressor       Compressor
	CIEntries          uint32
	CIOffset           uint64
	CICompressedSize   uint64
	CIUncompressedSize uint64
	ZranOffset         uint64 // zran/batch table offset
	ZranSize           uint64
	ZranCount          uint32
	Magic2             uint32 // at byte 4092
}

// Decode fills h from the BlobMetaHeaderSize bytes of b.
func (h *BlobMetaHeader) Decode(b []byte) {
	_ = b[BlobMetaHeaderSize-1]
	h.Magic = le.Uint32(b[0:])
	h.Features = le.Uint32(b[4:])
	h.CICompressor = Compressor(le.Uint32(b[8:]))
	h.CIEntries = le.Uint32(b[12:])
	h.CIOffset = le.Uint64(b[16:])
	h.CICompressedSize = le.Uint64(b[24:])
	h.CIUncompressedSize = le.Uint64(b[32:])
	h.ZranOffset = le.Uint64(b[40:])
	h.ZranSize = le.Uint64(b[48:])
	h.ZranCount = le.Uint32(b[56:])
	h.Magic2 = le.Uint32(b[4092:])
}

// Encode writes h into the first BlobMetaHeaderSize bytes of b, zeroing the
// reserved area.
func (h *BlobMetaHeader) Encode(b []byte) {
	_ = b[BlobMetaHeaderSize-1]
	clear(b[:BlobMetaHeaderSize])
	le.PutUint32(b[0:], h.Magic)
	le.PutUint32(b[4:], h.Features)
	le.PutUint32(b[8:], uint32(h.CICompressor))
	le.PutUint32(b[12:], h.CIEntries)
	le.PutUint64(b[16:], h.CIOffset)
	le.PutUint64(b[24:], h.CICompressedSize)
	le.PutUint64(b[32:], h.CIUncompressedSize)
	le.PutUint64(b[40:], h.ZranOffset)
	le.PutUint64(b[48:], h.ZranSize)
	le.PutUint32(b[56:], h.ZranCount)
	le.PutUint32(b[4092:], h.Magic2)
}

// The blob ToC (§11): BlobTOCEntrySize-byte entries at the tail of a blob
// with HAS_TOC, blob_toc_size bytes in all, followed by a
// BlobTOCTarHeaderSize-byte tar header when the blob has HAS_TAR_HEADER.
const (
	BlobTOCEntrySize        = 128
	BlobTOCTarHeaderSize    = 512
	BlobTOCFlagUncompressed = 0x1
	// BlobTOCDigestSection names the section holding the 32-byte chunk
	// digests in chunk-info order (INLINED_CHUNK_DIGEST blobs).
	BlobTOCDigestSection = "blob.digest"
)

// BlobTOCEntry is one entry of a blob's table of contents: a named section
// of the blob file.
type BlobTOCEntry struct {
	Flags            uint32   // 0: flags (BlobTOCFlagUncompressed)
	Name             string   // 8: name, 16 bytes NUL-padded
	Digest           [32]byte // 24: sha256 of the uncompressed section
	CompressedOffset uint64   // 56: where the section is stored
	CompressedSize   uint64   // 64
	UncompressedSize uint64   // 72
}

// Decode fills t from the BlobTOCEntrySize bytes of b.
func (t *BlobTOCEntry) Decode(b []byte) {
	_ = b[BlobTOCEntrySize-1]
	t.Flags = le.Uint32(b[0:])
	t.Name = string(bytes.TrimRight(b[8:24], "\x00"))
	copy(t.Digest[:], b[24:56])
	t.CompressedOffset = le.Uint64(b[56:])
	t.CompressedSize = le.Uint64(b[64:])
	t.UncompressedSize = le.Uint64(b[72:])
}

// BlobChunk is one decoded entry of a blob's chunk-info (ci) array (§11):
// where a chunk's bytes sit in the blob file and in its uncompressed space.
type BlobChunk struct {
	CompressedOffset   uint64
	CompressedSize     uint32
	UncompressedOffset uint64
	UncompressedSize   uint32
	Flags              uint32 // v2 only (ChunkFlag*)
}

// Compressed reports whether the stored bytes must be decompressed.
func (c *BlobChunk) Compressed() bool {
	return c.Flags&ChunkFlagCompressed != 0 || c.CompressedSize != c.UncompressedSize
}

// DecodeCIv1 decodes a 16-byte v1 chunk-info entry.
func DecodeCIv1(b []byte) BlobChunk {
	_ = b[CIv1EntrySize-1]
	u, c := le.Uint64(b[0:]), le.Uint64(b[8:])
	ch := BlobChunk{
		UncompressedOffset: u & 0xFFF_FFFF_F000,
		UncompressedSize:   uint32(u>>44|(u&0xF00)<<12) + 1,
		CompressedOffset:   c & 0xFF_FFFF_FFFF,
		CompressedSize:     uint32(c>>44|(c&0xF00_0000_0000)>>20) + 1,
	}
	if ch.CompressedSize != ch.UncompressedSize {
		ch.Flags |= ChunkFlagCompressed
	}
	return ch
}

// EncodeCIv1 encodes a v1 chunk-info entry. Uncompressed offsets must be
// 4 KiB aligned below 2^44 and sizes in [1, 2^24]; compressed offsets below
// 2^40.
func EncodeCIv1(b []byte, ch BlobChunk) error {
	_ = b[CIv1EntrySize-1]
	if ch.UncompressedOffset&0xFFF != 0 || ch.UncompressedOffset >= 1<<44 {
		return fmt.Errorf("ci v1: uncompressed offset %#x not 4 KiB aligned below 2^44", ch.UncompressedOffset)
	}
	if ch.CompressedOffset >= 1<<40 {
		return fmt.Errorf("ci v1: compressed offset %#x beyond 2^40", ch.CompressedOffset)
	}
	if ch.UncompressedSize == 0 || ch.UncompressedSize > 1<<24 || ch.CompressedSize == 0 || ch.CompressedSize > 1<<24 {
		return fmt.Errorf("ci v1: sizes %d/%d outside [1, 16 MiB]", ch.CompressedSize, ch.UncompressedSize)
	}
	us, cs := uint64(ch.UncompressedSize-1), uint64(ch.CompressedSize-1)
	u := ch.UncompressedOffset | us<<44 | (us>>20&0xF)<<8
	c := ch.CompressedOffset | cs<<44 | (cs>>20&0xF)<<40
	le.PutUint64(b[0:], u)
	le.PutUint64(b[8:], c)
	return nil
}

// DecodeCIv2 decodes a 24-byte v2 chunk-info entry.
func DecodeCIv2(b []byte) BlobChunk {
	_ = b[CIv2EntrySize-1]
	u, c := le.Uint64(b[0:]), le.Uint64(b[8:])
	return BlobChunk{
		UncompressedOffset: (u & 0xFFFF_FFFF) << 12,
		UncompressedSize:   uint32(u>>32&0xFF_FFFF) + 1,
		Flags:              uint32(u >> 56),
		CompressedOffset:   c & 0xFF_FFFF_FFFF,
		CompressedSize:     uint32(c >> 40 & 0xFF_FFFF),
	}
}

// log2 returns log2(v) for a power of two v, or -1.
func log2(v uint64) int {
	if v == 0 || v&(v-1) != 0 {
		return -1
	}
	return bits.TrailingZeros64(v)
}

// EncodeRdev packs a device number as EROFS stores it in i_u: the kernel's
// new_encode_dev layout (minor's low byte, 12 bits of major, then the rest
// of minor).
func EncodeRdev(major, minor uint32) uint32 {
	return minor&0xFF | major&0xFFF<<8 | (minor&^0xFF)<<12
}

// DecodeRdev is the inverse of EncodeRdev.
func DecodeRdev(rdev uint32) (major, minor uint32) {
	return rdev >> 8 & 0xFFF, rdev&0xFF | rdev>>12&^0xFF
}
