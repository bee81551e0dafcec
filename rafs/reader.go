package rafs

import (
	"fmt"
	"io"
	"math/bits"
	"os"
)

// Image is a parsed and validated RAFS v6 bootstrap. The tables of §2-§5 and
// §10 are decoded by NewImage; inodes and directories are read on demand
// from the underlying io.ReaderAt, and each is validated as it is read.
// An Image is safe for concurrent use if its io.ReaderAt is.
type Image struct {
	Superblock    Superblock
	ExtSuperblock ExtSuperblock
	DeviceSlots   []DeviceSlot // one per blob, in blob-table order
	Blobs         []BlobEntry  // the blob table; Blobs[i].BlobIndex == i
	ChunkTable    []ChunkInfo  // the bootstrap chunk table (§10), sorted by digest as stored
	PrefetchTable []uint32     // inode numbers to prefetch, nil when there is no table
	BlockSize     uint32       // EROFS block size: 4096, or 512 for tarfs
	Size          int64        // bootstrap size in bytes

	r        io.ReaderAt
	cache    *metaCache // recently read pages of r
	closer   io.Closer
	metaBase uint64 // byte offset of nid 0: meta_blkaddr * BlockSize
	maxNid   uint64 // largest nid whose 32-byte slot lies inside the bootstrap
}

// Limits the reader enforces beyond the format itself.
const (
	// MaxChunkSize and MinChunkSize bound the ext-superblock chunk size (§3).
	MinChunkSize = 4096
	MaxChunkSize = 16 << 20
	// MaxChunksPerBlob bounds a blob's chunk_count (24-bit ci index).
	MaxChunksPerBlob = 1 << 24
	// MaxSymlinkSize is the longest symlink target accepted (PATH_MAX-1).
	MaxSymlinkSize = 4095
	// MaxNameLen is EROFS_NAME_LEN.
	MaxNameLen = 255

	maxBlobUncompressedSize = 1 << 44
	maxBlobCompressedSize   = 1 << 40
	legacyBogusBlocks       = 4096 // s_blocks written by old builders (§2)
	knownExtFlags           = FlagCompressionNone | FlagCompressionLZ4 | FlagHashBlake3 | FlagHashSHA256 |
		FlagExplicitUIDGID | FlagHasXattr | FlagCompressionGzip | FlagCompressionZstd |
		FlagInlinedChunkDigest | FlagTarfsMode | FlagEncryptionNone | FlagEncryptionAES128 |
		0xFC00_0000 // reserved-compat bits (§3)
	featureCompatSBChecksum = 0x1
)

// Open opens the named bootstrap file and parses it with NewImage.
// Close releases the file.
func Open(name string) (*Image, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	img, err := NewImage(f, fi.Size())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	img.closer = f
	return img, nil
}

// Close closes the file opened by Open; it does nothing for an Image made
// by NewImage.
func (img *Image) Close() error {
	if img.closer == nil {
		return nil
	}
	err := img.closer.Close()
	img.closer = nil
	return err
}

// NewImage parses and validates the RAFS v6 bootstrap of size bytes in r:
// superblock, extended superblock, device table, blob table, prefetch table
// and chunk table, and the root inode. Violations are reported as
// *FormatError.
func NewImage(r io.ReaderAt, size int64) (*Image, error) {
	img := &Image{r: r, Size: size, cache: newMetaCache(r, size)}
	if size < MetaAlign {
		return nil, formatErr(0, "bootstrap", "size", uint64(max(size, 0)), "smaller than one 4 KiB block")
	}
	if size%MetaAlign != 0 {
		return nil, formatErr(0, "bootstrap", "size", uint64(size), "not a multiple of 4096")
	}
	head, err := img.read(0, MetaAlign, "bootstrap", "block 0")
	if err != nil {
		return nil, err
	}
	img.Superblock.Decode(head[SuperblockOffset:])
	img.ExtSuperblock.Decode(head[ExtSuperblockOffset:])
	if err := img.checkSuperblock(); err != nil {
		return nil, err
	}
	if err := img.checkExtSuperblock(); err != nil {
		return nil, err
	}
	if err := img.readDevicesAndBlobs(); err != nil {
		return nil, err
	}
	if err := img.readPrefetchTable(); err != nil {
		return nil, err
	}
	if err := img.readChunkTable(); err != nil {
		return nil, err
	}
	root, err := img.Inode(img.RootNid())
	if err != nil {
		return nil, err
	}
	if !root.IsDir() {
		return nil, formatErr(SuperblockOffset+14, "superblock", "root_nid", img.Superblock.RootNid,
			"root inode is not a directory (mode %#o)", root.Mode)
	}
	return img, nil
}

// RootNid is the nid of the root directory.
func (img *Image) RootNid() uint64 { return uint64(img.Superblock.RootNid) }

// IsTarfs reports whether the image is in tarfs mode (blobs are raw tars,
// 512-byte blocks).
func (img *Image) IsTarfs() bool { return img.ExtSuperblock.Flags&FlagTarfsMode != 0 }

// Compressor is the image-wide compressor named by the ext-superblock flags.
func (img *Image) Compressor() Compressor {
	switch {
	case img.ExtSuperblock.Flags&FlagCompressionLZ4 != 0:
		return CompressLZ4Block
	case img.ExtSuperblock.Flags&FlagCompressionGzip != 0:
		return CompressGzip
	case img.ExtSuperblock.Flags&FlagCompressionZstd != 0:
		return CompressZstd
	}
	return CompressNone
}

// Digester is the image-wide chunk digest named by the ext-superblock flags.
func (img *Image) Digester() Digester {
	if img.ExtSuperblock.Flags&FlagHashSHA256 != 0 {
		return DigestSHA256
	}
	return DigestBlake3
}

// ReaderAt returns the bootstrap bytes the image was parsed from.
func (img *Image) ReaderAt() io.ReaderAt { return img.r }

// read returns n bytes at off, which must lie inside the bootstrap; strct
// and field name what is being read for the error.
func (img *Image) read(off, n uint64, strct, field string) ([]byte, error) {
	end, carry := bits.Add64(off, n, 0)
	if carry != 0 || end > uint64(img.Size) {
		return nil, formatErr(off, strct, field, n, "%d bytes at offset %d run past the end of the %d-byte bootstrap", n, off, img.Size)
	}
	buf := make([]byte, n)
	if n == 0 {
		return buf, nil
	}
	if err := img.cache.readAt(buf, int64(off)); err != nil {
		return nil, fmt.Errorf("rafs: reading %s %s at offset %d: %w", strct, field, off, err)
	}
	return buf, nil
}

func (img *Image) checkSuperblock() error {
	sb := &img.Superblock
	const o = SuperblockOffset
	const s = "superblock"
	switch {
	case sb.Magic != ErofsMagic:
		return formatErr(o+0, s, "magic", sb.Magic, "not an EROFS superblock (want %#x)", ErofsMagic)
	case sb.Checksum != 0:
		return formatErr(o+4, s, "checksum", sb.Checksum, "must be 0 in RAFS v6")
	case sb.FeatureCompat&FeatureCompatRafsV6 == 0:
		return formatErr(o+8, s, "feature_compat", sb.FeatureCompat, "RAFS_V6 bit %#x not set", FeatureCompatRafsV6)
	case sb.FeatureCompat&featureCompatSBChecksum != 0:
		// The kernel would verify a crc32c that RAFS never writes.
		return formatErr(o+8, s, "feature_compat", sb.FeatureCompat, "SB_CHKSUM must not be set in RAFS v6")
	case sb.BlkSzBits != BlockSizeBitsDefault && sb.BlkSzBits != BlockSizeBitsTarfs:
		return formatErr(o+12, s, "blkszbits", sb.BlkSzBits, "must be 12 (4 KiB) or 9 (tarfs, 512 B)")
	case sb.ExtSlots != 0:
		return formatErr(o+13, s, "extslots", sb.ExtSlots, "must be 0")
	case sb.Inos == 0:
		return formatErr(o+16, s, "inos", sb.Inos, "must not be 0")
	case sb.XattrBlkAddr != 0:
		return formatErr(o+44, s, "xattr_blkaddr", sb.XattrBlkAddr, "shared xattrs are not used by RAFS v6")
	case sb.FeatureIncompat != FeatureIncompatRafsV6:
		return formatErr(o+80, s, "feature_incompat", sb.FeatureIncompat, "must be exactly %#x (CHUNKED_FILE|DEVICE_TABLE)", FeatureIncompatRafsV6)
	case sb.U1 != 0:
		return formatErr(o+84, s, "u1", sb.U1, "must be 0")
	case sb.DevtSlotOff != DevtSlotOff:
		return formatErr(o+88, s, "devt_slotoff", sb.DevtSlotOff, "must be %d", DevtSlotOff)
	case sb.ExtraDevices > MaxBlobs:
		return formatErr(o+86, s, "extra_devices", sb.ExtraDevices, "more than %d blobs", MaxBlobs)
	case sb.ExtraDevices == 0 && sb.Blocks != 0 && sb.Blocks != legacyBogusBlocks:
		return formatErr(o+36, s, "blocks", sb.Blocks, "must be 0 (or the legacy 4096) without extra devices")
	}
	for i, c := range sb.Reserved {
		if c != 0 {
			// Newer EROFS features live here (dirblkbits, packed_nid, ...);
			// any of them would change how the kernel reads the image.
			return formatErr(o+90+i, s, "reserved", c, "must be zero in RAFS v6")
		}
	}
	img.BlockSize = sb.BlockSize()
	img.metaBase = uint64(sb.MetaBlkAddr) * uint64(img.BlockSize)
	if img.metaBase >= uint64(img.Size) {
		return formatErr(o+40, s, "meta_blkaddr", sb.MetaBlkAddr, "inode area starts at %d, past the %d-byte bootstrap", img.metaBase, img.Size)
	}
	if img.metaBase < MetaAlign {
		return formatErr(o+40, s, "meta_blkaddr", sb.MetaBlkAddr, "inode area at %d overlaps the superblock block", img.metaBase)
	}
	img.maxNid = (uint64(img.Size)-img.metaBase)/InodeSlotSize - 1
	if uint64(sb.RootNid) > img.maxNid {
		return formatErr(o+14, s, "root_nid", sb.RootNid, "root inode lies past the end of the bootstrap")
	}
	return nil
}

func (img *Image) checkExtSuperblock() error {
	ext := &img.ExtSuperblock
	const o = ExtSuperblockOffset
	const s = "ext superblock"
	if bits.OnesCount64(ext.Flags&flagCompressionMask) != 1 {
		return formatErr(o, s, "flags", ext.Flags, "need exactly one compression flag")
	}
	if bits.OnesCount64(ext.Flags&flagHashMask) != 1 {
		return formatErr(o, s, "flags", ext.Flags, "need exactly one digest flag")
	}
	if unknown := ext.Flags &^ knownExtFlags; unknown != 0 {
		return formatErr(o, s, "flags", ext.Flags, "unknown flag bits %#x", unknown)
	}
	if ext.Flags&FlagTarfsMode != 0 && img.BlockSize != 1<<BlockSizeBitsTarfs {
		// nydus pairs tarfs mode with 512-byte blocks; chunk addresses of a
		// tar's 512-aligned members cannot be expressed in 4 KiB blocks.
		return formatErr(o, s, "flags", ext.Flags, "TARFS_MODE needs blkszbits 9, have %d", img.Superblock.BlkSzBits)
	}
	if cs := ext.ChunkSize; log2(uint64(cs)) < 0 || cs < MinChunkSize || cs > MaxChunkSize {
		return formatErr(o+20, s, "chunk_size", cs, "must be a power of two in [4 KiB, 16 MiB]")
	}
	devEnd := uint64(DeviceSlotOffset) + uint64(img.Superblock.ExtraDevices)*DeviceSlotSize
	bto, bts := ext.BlobTableOffset, uint64(ext.BlobTableSize)
	switch {
	case bto%MetaAlign != 0 || bto < MetaAlign || bto < devEnd:
		return formatErr(o+8, s, "blob_table_offset", bto, "must be 4 KiB aligned, at least 4096 and past the device table (ends at %d)", devEnd)
	case bts%BlobEntrySize != 0:
		return formatErr(o+16, s, "blob_table_size", ext.BlobTableSize, "not a multiple of %d", BlobEntrySize)
	case bts/BlobEntrySize != uint64(img.Superblock.ExtraDevices):
		return formatErr(o+16, s, "blob_table_size", ext.BlobTableSize, "holds %d blobs but the superblock has %d extra devices", bts/BlobEntrySize, img.Superblock.ExtraDevices)
	case bto > uint64(img.Size) || bts > uint64(img.Size)-bto:
		return formatErr(o+8, s, "blob_table_offset", bto, "blob table of %d bytes runs past the %d-byte bootstrap", bts, img.Size)
	}
	if cto, cts := ext.ChunkTableOffset, ext.ChunkTableSize; cts > 0 {
		switch {
		case cto%MetaAlign != 0 || cto < MetaAlign || cto < devEnd:
			return formatErr(o+24, s, "chunk_table_offset", cto, "must be 4 KiB aligned and past the device table")
		case cts%ChunkInfoSize != 0:
			return formatErr(o+32, s, "chunk_table_size", cts, "not a multiple of %d", ChunkInfoSize)
		case cto > uint64(img.Size) || cts > uint64(img.Size)-cto:
			return formatErr(o+24, s, "chunk_table_offset", cto, "chunk table of %d bytes runs past the %d-byte bootstrap", cts, img.Size)
		case overlaps(bto, bts, cto, cts):
			return formatErr(o+24, s, "chunk_table_offset", cto, "chunk table overlaps the blob table")
		}
	}
	// Legacy builders wrote a size with offset 0 for empty file systems;
	// nydus ignores the table then, and so do we.
	if pto, pts := ext.PrefetchTableOffset, uint64(ext.PrefetchTableSize); pto != 0 && pts > 0 {
		switch {
		case pto < MetaAlign || pto < devEnd:
			return formatErr(o+40, s, "prefetch_table_offset", pto, "must be at least 4096 and past the device table")
		case pts%4 != 0:
			return formatErr(o+48, s, "prefetch_table_size", ext.PrefetchTableSize, "not a multiple of 4")
		case pto > uint64(img.Size) || pts > uint64(img.Size)-pto:
			return formatErr(o+40, s, "prefetch_table_offset", pto, "prefetch table of %d bytes runs past the %d-byte bootstrap", pts, img.Size)
		case overlaps(bto, bts, pto, pts):
			return formatErr(o+40, s, "prefetch_table_offset", pto, "prefetch table overlaps the blob table")
		case ext.ChunkTableSize > 0 && overlaps(ext.ChunkTableOffset, ext.ChunkTableSize, pto, pts):
			return formatErr(o+40, s, "prefetch_table_offset", pto, "prefetch table overlaps the chunk table")
		}
	}
	return nil
}

// overlaps reports whether [a, a+an) and [b, b+bn) intersect; the ranges
// are known not to overflow.
func overlaps(a, an, b, bn uint64) bool {
	return an > 0 && bn > 0 && a < b+bn && b < a+an
}

func (img *Image) readDevicesAndBlobs() error {
	n := int(img.Superblock.ExtraDevices)
	if n == 0 {
		return nil
	}
	slots, err := img.read(DeviceSlotOffset, uint64(n)*DeviceSlotSize, "device table", "")
	if err != nil {
		return err
	}
	table, err := img.read(img.ExtSuperblock.BlobTableOffset, uint64(n)*BlobEntrySize, "blob table", "")
	if err != nil {
		return err
	}
	img.DeviceSlots = make([]DeviceSlot, n)
	img.Blobs = make([]BlobEntry, n)
	for i := range n {
		img.DeviceSlots[i].Decode(slots[i*DeviceSlotSize:])
		img.Blobs[i].Decode(table[i*BlobEntrySize:])
	}
	for i := range n {
		if err := img.checkBlob(i); err != nil {
			return err
		}
		if err := img.checkDeviceSlot(i); err != nil {
			return err
		}
	}
	// s_blocks should be the sum of the slots' blocks, but only statfs
	// reads it, builders have written other values (the legacy 4096), and
	// nydus does not check it when there are devices; neither do we.
	return nil
}

func (img *Image) checkBlob(i int) error {
	e := &img.Blobs[i]
	o := int64(img.ExtSuperblock.BlobTableOffset) + int64(i)*BlobEntrySize
	s := fmt.Sprintf("blob table entry %d", i)
	if err := checkBlobID(e.BlobID, o, s); err != nil {
		return err
	}
	tarfsMode := img.IsTarfs()
	switch {
	case e.BlobIndex != uint32(i):
		return formatErr(o+64, s, "blob_index", e.BlobIndex, "must equal the entry's position %d", i)
	case e.ChunkSize != img.ExtSuperblock.ChunkSize:
		return formatErr(o+68, s, "chunk_size", e.ChunkSize, "must equal the ext superblock chunk size %d", img.ExtSuperblock.ChunkSize)
	case e.ChunkCount > MaxChunksPerBlob:
		return formatErr(o+72, s, "chunk_count", e.ChunkCount, "more than 2^24 chunks")
	case e.Compressor > CompressZstd:
		return formatErr(o+76, s, "compression", uint32(e.Compressor), "unknown compressor")
	case e.Digester > DigestSHA256:
		return formatErr(o+80, s, "digester", uint32(e.Digester), "unknown digester")
	case e.Features&blobFeatureIncompatUnknown != 0:
		return formatErr(o+84, s, "features", e.Features, "unknown incompatible feature bits %#x", e.Features&blobFeatureIncompatUnknown)
	case e.Features&BlobFeatureAligned == 0 && !tarfsMode:
		return formatErr(o+84, s, "features", e.Features, "ALIGNED must be set outside tarfs mode")
	case e.Features&BlobFeatureAligned != 0 && tarfsMode:
		return formatErr(o+84, s, "features", e.Features, "ALIGNED must not be set in tarfs mode")
	case e.CompressedSize > maxBlobCompressedSize:
		return formatErr(o+88, s, "compressed_size", e.CompressedSize, "beyond 2^40")
	case e.UncompressedSize > maxBlobUncompressedSize:
		return formatErr(o+96, s, "uncompressed_size", e.UncompressedSize, "beyond 2^44")
	case e.CICompressor > CompressZstd:
		return formatErr(o+108, s, "ci_compressor", uint32(e.CICompressor), "unknown compressor")
	case e.CIOffset+e.CICompressedSize < e.CIOffset:
		return formatErr(o+112, s, "ci_offset", e.CIOffset, "ci_offset + ci_compressed_size overflows")
	case e.CICompressedSize > e.CIUncompressedSize:
		return formatErr(o+120, s, "ci_compressed_size", e.CICompressedSize, "larger than ci_uncompressed_size %d", e.CIUncompressedSize)
	case e.CipherAlgo > 3:
		return formatErr(o+216, s, "cipher", e.CipherAlgo, "unknown cipher")
	}
	if e.IsTarfs() && e.Compressor != CompressNone {
		return formatErr(o+76, s, "compression", uint32(e.Compressor), "a tarfs blob is an uncompressed tar")
	}
	count := uint64(e.ChunkCount)
	v2 := e.Features&BlobFeatureChunkInfoV2 != 0
	special := e.Features&(BlobFeatureBatch|BlobFeatureZran|BlobFeatureEncrypted) != 0
	switch {
	case v2 && special:
		if e.CIUncompressedSize < count*CIv2EntrySize {
			return formatErr(o+128, s, "ci_uncompressed_size", e.CIUncompressedSize, "smaller than %d chunks of %d bytes", count, CIv2EntrySize)
		}
	case v2:
		if e.CIUncompressedSize != count*CIv2EntrySize {
			return formatErr(o+128, s, "ci_uncompressed_size", e.CIUncompressedSize, "must be %d chunks × %d bytes", count, CIv2EntrySize)
		}
	case special:
		return formatErr(o+84, s, "features", e.Features, "BATCH, ZRAN and ENCRYPTED need CHUNK_INFO_V2")
	case e.Features&BlobFeatureChunkdictGenerated == 0 && !tarfsMode:
		if e.CIUncompressedSize != count*CIv1EntrySize {
			return formatErr(o+128, s, "ci_uncompressed_size", e.CIUncompressedSize, "must be %d chunks × %d bytes", count, CIv1EntrySize)
		}
	}
	return nil
}

func (img *Image) checkDeviceSlot(i int) error {
	d, e := &img.DeviceSlots[i], &img.Blobs[i]
	o := int64(DeviceSlotOffset) + int64(i)*DeviceSlotSize
	s := fmt.Sprintf("device slot %d", i)
	if d.BlobID != e.BlobID {
		return formatErr(o, s, "blob_id", d.ID(), "differs from blob table entry %d (%q)", i, e.ID())
	}
	if want := e.UncompressedSize / uint64(img.BlockSize); uint64(d.Blocks) != want {
		return formatErr(o+64, s, "blocks", d.Blocks, "must be uncompressed_size/block size = %d", want)
	}
	for j, c := range d.Reserved {
		if c != 0 {
			// blocks_hi/uniaddr_hi of newer EROFS would move the blob.
			return formatErr(o+72+int64(j), s, "reserved", c, "must be zero")
		}
	}
	return nil
}

// checkBlobID accepts the ASCII ids nydus writes: a name made of letters,
// digits, '-', '_' and '.', NUL padded. Blob ids become file names in blob
// directories, so anything that could escape one ('/', "..") is refused.
func checkBlobID(id [64]byte, off int64, strct string) error {
	n := 0
	for n < len(id) && id[n] != 0 {
		c := id[n]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-' || c == '_' || c == '.') {
			return formatErr(off+int64(n), strct, "blob_id", c, "invalid character in blob id")
		}
		n++
	}
	for j := n; j < len(id); j++ {
		if id[j] != 0 {
			return formatErr(off+int64(j), strct, "blob_id", id[j], "NUL inside blob id")
		}
	}
	if name := string(id[:n]); name == "" || name == "." || name == ".." {
		return formatErr(off, strct, "blob_id", name, "empty or dot blob id")
	}
	return nil
}

// ID is the blob id as a string, without NUL padding.
func (e *BlobEntry) ID() string { return cstring(e.BlobID[:]) }

// ID is the slot's blob id as a string, without NUL padding.
func (d *DeviceSlot) ID() string { return cstring(d.BlobID[:]) }

func cstring(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

func (img *Image) readPrefetchTable() error {
	ext := &img.ExtSuperblock
	if ext.PrefetchTableOffset == 0 || ext.PrefetchTableSize == 0 {
		return nil
	}
	b, err := img.read(ext.PrefetchTableOffset, uint64(ext.PrefetchTableSize), "prefetch table", "")
	if err != nil {
		return err
	}
	img.PrefetchTable = make([]uint32, len(b)/4)
	for i := range img.PrefetchTable {
		img.PrefetchTable[i] = le.Uint32(b[4*i:])
	}
	return nil
}

func (img *Image) readChunkTable() error {
	ext := &img.ExtSuperblock
	if ext.ChunkTableSize == 0 {
		return nil
	}
	b, err := img.read(ext.ChunkTableOffset, ext.ChunkTableSize, "chunk table", "")
	if err != nil {
		return err
	}
	img.ChunkTable = make([]ChunkInfo, len(b)/ChunkInfoSize)
	for i := range img.ChunkTable {
		c := &img.ChunkTable[i]
		c.Decode(b[i*ChunkInfoSize:])
		o := int64(ext.ChunkTableOffset) + int64(i)*ChunkInfoSize
		s := fmt.Sprintf("chunk table entry %d", i)
		if c.BlobIndex >= uint32(len(img.Blobs)) {
			return formatErr(o+32, s, "blob_index", c.BlobIndex, "no such blob (%d blobs)", len(img.Blobs))
		}
		blob := &img.Blobs[c.BlobIndex]
		if c.Index >= blob.ChunkCount {
			return formatErr(o+72, s, "index", c.Index, "beyond blob %d's %d chunks", c.BlobIndex, blob.ChunkCount)
		}
		if c.UncompressedOffset > blob.UncompressedSize || uint64(c.UncompressedSize) > blob.UncompressedSize-c.UncompressedOffset {
			return formatErr(o+56, s, "uncompressed_offset", c.UncompressedOffset,
				"chunk of %d bytes runs past blob %d's uncompressed size %d", c.UncompressedSize, c.BlobIndex, blob.UncompressedSize)
		}
	}
	return nil
}
