package rafs

import (
	"fmt"
	"io/fs"
	"time"
)

// Xattr is one extended attribute with its full name, prefix included
// ("user.foo", "system.posix_acl_access").
type Xattr struct {
	Name  string
	Value []byte
}

// Entry is the name-less view of one inode: what stat(2) shows plus where
// the data lives. It is returned by Image.Inode and passed to Walk.
type Entry struct {
	Nid       uint64
	Inode     Inode  // the decoded on-disk inode
	Ino       uint32 // i_ino, the 32-bit inode number (not the nid)
	Mode      uint16 // st_mode: ModeTypeMask bits and permissions
	UID, GID  uint32
	Size      uint64
	Mtime     uint64 // seconds; for compact inodes the build time plus the inode's delta
	MtimeNsec uint32
	Nlink     uint32
	Rdev      uint32  // character and block devices only
	Xattrs    []Xattr // inline xattrs in on-disk order
	// ChunkSize is the chunk size of a chunk-based regular file, which can
	// differ from the image's: bs << (chunk format & 0x1F).
	ChunkSize uint64
	// Chunks are the chunk indexes of a regular file, ceil(Size/ChunkSize)
	// of them. Each is validated against the blob table.
	Chunks []ChunkIndex
	Target string // symlink target

	// inlineOff is where inline data (tail or chunk indexes) starts.
	inlineOff uint64
}

// IsDir reports whether the entry is a directory.
func (e *Entry) IsDir() bool { return e.Mode&ModeTypeMask == ModeDir }

// IsRegular reports whether the entry is a regular file.
func (e *Entry) IsRegular() bool { return e.Mode&ModeTypeMask == ModeRegular }

// IsSymlink reports whether the entry is a symbolic link.
func (e *Entry) IsSymlink() bool { return e.Mode&ModeTypeMask == ModeSymlink }

// ModTime is the modification time.
func (e *Entry) ModTime() time.Time { return time.Unix(int64(e.Mtime), int64(e.MtimeNsec)) }

// FileMode converts Mode to an io/fs mode.
func (e *Entry) FileMode() fs.FileMode {
	m := fs.FileMode(e.Mode & 0o777)
	if e.Mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if e.Mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if e.Mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	switch e.Mode & ModeTypeMask {
	case ModeDir:
		m |= fs.ModeDir
	case ModeSymlink:
		m |= fs.ModeSymlink
	case ModeChar:
		m |= fs.ModeDevice | fs.ModeCharDevice
	case ModeBlock:
		m |= fs.ModeDevice
	case ModeFifo:
		m |= fs.ModeNamedPipe
	case ModeSocket:
		m |= fs.ModeSocket
	}
	return m
}

// FileType is the directory-entry file type (FileType*) matching Mode.
func (e *Entry) FileType() uint8 { return FileTypeOf(uint32(e.Mode)) }

// Inode reads and validates the inode with the given nid: layout, xattrs,
// chunk indexes (regular files) and target (symlinks). Directory contents
// are read by ReadDir.
func (img *Image) Inode(nid uint64) (*Entry, error) {
	s := fmt.Sprintf("inode %d", nid)
	if nid > img.maxNid {
		return nil, &FormatError{Off: -1, Struct: s, Field: "nid", Val: nid,
			Msg: fmt.Sprintf("beyond the last inode slot %d of the bootstrap", img.maxNid)}
	}
	off := img.metaBase + nid*InodeSlotSize
	n := min(uint64(ExtendedInodeSize), uint64(img.Size)-off)
	b, err := img.read(off, n, s, "")
	if err != nil {
		return nil, err
	}
	ino, err := DecodeInode(b)
	if err != nil {
		return nil, formatErr(off, s, "i_format", le.Uint16(b), "%v", err)
	}
	e := &Entry{
		Nid: nid, Inode: ino, Ino: ino.Ino, Mode: ino.Mode, UID: ino.UID, GID: ino.GID,
		Size: ino.Size, Mtime: ino.Mtime, MtimeNsec: ino.MtimeNsec, Nlink: ino.Nlink,
	}
	if !ino.Extended() {
		// Compact inodes carry a 32-bit mtime delta at byte 12 (formerly
		// reserved; RAFS writes 0) that the kernel adds to the build time
		// (checked by mounting on 6.18; erofs-utils 1.5 ignores it).
		e.Mtime = img.Superblock.BuildTime + ino.Mtime
		e.MtimeNsec = img.Superblock.BuildTimeNsec
	}
	if ino.Format&^0xF != 0 {
		return nil, formatErr(off, s, "i_format", ino.Format, "unknown format bits")
	}
	layout := ino.Layout()
	if layout != LayoutFlatPlain && layout != LayoutFlatInline && layout != LayoutChunkBased {
		return nil, formatErr(off, s, "i_format", ino.Format, "data layout %d is not used by RAFS v6", layout)
	}
	xoff := off + uint64(ino.SizeOnDisk())
	xsize := uint64(ino.XattrSize())
	if ino.XattrCount > 0 {
		xb, err := img.read(xoff, xsize, s, "xattrs")
		if err != nil {
			return nil, err
		}
		if e.Xattrs, err = parseXattrs(xb, xoff, s); err != nil {
			return nil, err
		}
	}
	e.inlineOff = xoff + xsize
	if e.inlineOff > uint64(img.Size) {
		return nil, formatErr(off, s, "i_xattr_icount", ino.XattrCount, "xattr area runs past the bootstrap")
	}

	switch ino.Mode & ModeTypeMask {
	case ModeRegular:
		if layout == LayoutChunkBased {
			if err := img.readChunks(e, off, s); err != nil {
				return nil, err
			}
		} else if ino.Size != 0 {
			return nil, formatErr(off, s, "i_format", ino.Format, "regular file with data must be chunk-based")
		}
	case ModeDir:
		if layout == LayoutChunkBased {
			return nil, formatErr(off, s, "i_format", ino.Format, "directory must use a flat layout")
		}
		if ino.Size == 0 {
			return nil, formatErr(off+8, s, "i_size", ino.Size, "directory without . and ..")
		}
		if _, _, err := img.flatRanges(e, off, s); err != nil {
			return nil, err
		}
	case ModeSymlink:
		if layout == LayoutChunkBased {
			return nil, formatErr(off, s, "i_format", ino.Format, "symlink must use a flat layout")
		}
		if ino.Size == 0 || ino.Size > MaxSymlinkSize {
			return nil, formatErr(off+8, s, "i_size", ino.Size, "symlink target must be 1..%d bytes", MaxSymlinkSize)
		}
		data, err := img.flatData(e, off, s)
		if err != nil {
			return nil, err
		}
		for i, c := range data {
			if c == 0 {
				return nil, formatErr(off+8, s, "i_size", ino.Size, "NUL at byte %d of the symlink target", i)
			}
		}
		e.Target = string(data)
	case ModeChar, ModeBlock, ModeFifo, ModeSocket:
		if layout != LayoutFlatPlain {
			return nil, formatErr(off, s, "i_format", ino.Format, "special file must use FLAT_PLAIN")
		}
		if ino.Size != 0 {
			return nil, formatErr(off+8, s, "i_size", ino.Size, "special file must have size 0")
		}
		if t := ino.Mode & ModeTypeMask; t == ModeChar || t == ModeBlock {
			e.Rdev = ino.U
		}
	default:
		return nil, formatErr(off+4, s, "i_mode", ino.Mode, "unknown file type")
	}
	return e, nil
}

// readChunks decodes and validates a chunk-based file's chunk indexes (§8).
func (img *Image) readChunks(e *Entry, off uint64, s string) error {
	format := e.Inode.U
	if format&^uint32(ChunkFormatBlkBitsMask|ChunkFormatIndexes) != 0 {
		return formatErr(off+16, s, "i_u", format, "unknown chunk format bits (48-bit and others are not used by RAFS)")
	}
	if format&ChunkFormatIndexes == 0 {
		return formatErr(off+16, s, "i_u", format, "chunk format without INDEXES; RAFS always uses 8-byte chunk indexes")
	}
	e.ChunkSize = uint64(img.BlockSize) << (format & ChunkFormatBlkBitsMask)
	count := e.Size / e.ChunkSize
	if e.Size%e.ChunkSize != 0 {
		count++
	}
	idxOff := (e.inlineOff + 7) &^ 7
	if count > uint64(img.Size)/ChunkIndexSize {
		return formatErr(off+8, s, "i_size", e.Size, "%d chunks of %d bytes cannot fit in the bootstrap", count, e.ChunkSize)
	}
	b, err := img.read(idxOff, count*ChunkIndexSize, s, "chunk indexes")
	if err != nil {
		return err
	}
	e.Chunks = make([]ChunkIndex, count)
	for k := range e.Chunks {
		c := &e.Chunks[k]
		c.Decode(b[k*ChunkIndexSize:])
		if err := img.checkChunk(e, k, idxOff+uint64(k)*ChunkIndexSize, s); err != nil {
			return err
		}
	}
	return nil
}

func (img *Image) checkChunk(e *Entry, k int, off uint64, s string) error {
	c := &e.Chunks[k]
	if c.BlkAddr == NullBlkAddr {
		return nil // a hole: reads as zeros
	}
	bi := c.BlobIndex()
	if bi < 0 || bi >= len(img.Blobs) {
		return formatErr(off+2, s, fmt.Sprintf("chunk %d device_id", k), c.DeviceID,
			"names blob %d; the image has %d blobs", bi, len(img.Blobs))
	}
	blob := &img.Blobs[bi]
	if ci := c.CIIndex(); ci >= blob.ChunkCount {
		return formatErr(off, s, fmt.Sprintf("chunk %d ci index", k), ci, "beyond blob %d's %d chunks", bi, blob.ChunkCount)
	}
	start := uint64(c.BlkAddr) * uint64(img.BlockSize)
	length := min(e.ChunkSize, e.Size-uint64(k)*e.ChunkSize)
	if start > blob.UncompressedSize || length > blob.UncompressedSize-start {
		return formatErr(off+4, s, fmt.Sprintf("chunk %d blkaddr", k), c.BlkAddr,
			"%d bytes at %d run past blob %d's uncompressed size %d", length, start, bi, blob.UncompressedSize)
	}
	return nil
}

// flatRanges locates the data of a FLAT_PLAIN or FLAT_INLINE inode (§7):
// full blocks at i_u·bs, and for FLAT_INLINE a tail right after the inode
// and its xattrs, which must not cross a block boundary.
func (img *Image) flatRanges(e *Entry, off uint64, s string) (blocks, tail [2]uint64, err error) {
	bs := uint64(img.BlockSize)
	size := e.Size
	if size > uint64(img.Size) {
		return blocks, tail, formatErr(off+8, s, "i_size", size, "larger than the bootstrap")
	}
	full := size
	if e.Inode.Layout() == LayoutFlatInline {
		full = size &^ (bs - 1)
		tail = [2]uint64{e.inlineOff, size - full}
		if t := tail[1]; t > 0 {
			if e.inlineOff%bs+t > bs {
				return blocks, tail, formatErr(off+8, s, "i_size", size,
					"inline tail of %d bytes at offset %d crosses a block boundary", t, e.inlineOff)
			}
			if e.inlineOff+t > uint64(img.Size) {
				return blocks, tail, formatErr(off+8, s, "i_size", size, "inline tail runs past the bootstrap")
			}
		}
	}
	if full > 0 {
		start := uint64(e.Inode.U) * bs
		if start > uint64(img.Size) || full > uint64(img.Size)-start {
			return blocks, tail, formatErr(off+16, s, "i_u", e.Inode.U,
				"%d data bytes at block %d run past the bootstrap", full, e.Inode.U)
		}
		blocks = [2]uint64{start, full}
	}
	return blocks, tail, nil
}

// flatData reads the whole data of a flat inode.
func (img *Image) flatData(e *Entry, off uint64, s string) ([]byte, error) {
	blocks, tail, err := img.flatRanges(e, off, s)
	if err != nil {
		return nil, err
	}
	data, err := img.read(blocks[0], blocks[1], s, "data blocks")
	if err != nil {
		return nil, err
	}
	if tail[1] > 0 {
		t, err := img.read(tail[0], tail[1], s, "inline data")
		if err != nil {
			return nil, err
		}
		data = append(data, t...)
	}
	return data, nil
}

// parseXattrs decodes an inline xattr area (§9) of exactly len(b) bytes.
func parseXattrs(b []byte, off uint64, s string) ([]Xattr, error) {
	if len(b) < XattrHeaderSize {
		return nil, formatErr(off, s, "i_xattr_icount", len(b), "xattr area shorter than its header")
	}
	if shared := b[4]; shared != 0 {
		return nil, formatErr(off+4, s, "xattr h_shared_count", shared, "shared xattrs are not used by RAFS v6")
	}
	var xs []Xattr
	seen := map[string]bool{}
	for p := XattrHeaderSize; p < len(b); {
		eoff := off + uint64(p)
		if len(b)-p < XattrEntrySize {
			return nil, formatErr(eoff, s, "xattr entry", len(b)-p, "entry header runs past the xattr area")
		}
		var x XattrEntry
		x.Decode(b[p:])
		total := XattrEntrySize + int(x.NameLen) + int(x.ValueSize)
		if total > len(b)-p {
			return nil, formatErr(eoff, s, "xattr e_value_size", x.ValueSize,
				"entry of %d bytes runs past the xattr area (%d bytes left)", total, len(b)-p)
		}
		prefix, ok := XattrPrefix(x.NameIndex)
		if !ok {
			return nil, formatErr(eoff+1, s, "xattr e_name_index", x.NameIndex, "unknown name index")
		}
		suffix := b[p+XattrEntrySize : p+XattrEntrySize+int(x.NameLen)]
		isACL := x.NameIndex == XattrIndexPosixACLAccess || x.NameIndex == XattrIndexPosixACLDefault
		if isACL != (len(suffix) == 0) {
			return nil, formatErr(eoff, s, "xattr e_name_len", x.NameLen, "name suffix must be empty exactly for POSIX ACLs")
		}
		for _, c := range suffix {
			if c == 0 {
				return nil, formatErr(eoff, s, "xattr name", string(suffix), "NUL in xattr name")
			}
		}
		name := prefix + string(suffix)
		if seen[name] {
			return nil, formatErr(eoff, s, "xattr name", name, "duplicate xattr")
		}
		seen[name] = true
		value := b[p+XattrEntrySize+int(x.NameLen) : p+total]
		xs = append(xs, Xattr{Name: name, Value: append([]byte(nil), value...)})
		p += (total + 3) &^ 3
	}
	return xs, nil
}

// Extent maps a range of a regular file to its bytes: Length bytes at
// BlobOffset in the uncompressed space of blob Blob (an index into
// Image.Blobs), or zeros when Blob is -1 (a hole chunk).
type Extent struct {
	FileOffset uint64
	Length     uint64
	Blob       int
	BlobOffset uint64
}

// FileExtents maps a regular file's bytes, one extent per chunk, in file
// order. The extents cover [0, e.Size) without gaps.
func (img *Image) FileExtents(e *Entry) ([]Extent, error) {
	if !e.IsRegular() {
		return nil, fmt.Errorf("rafs: inode %d: FileExtents of a non-regular file (mode %#o)", e.Nid, e.Mode)
	}
	if e.Size == 0 {
		return nil, nil
	}
	if e.ChunkSize == 0 || uint64(len(e.Chunks)) != (e.Size-1)/e.ChunkSize+1 {
		return nil, fmt.Errorf("rafs: inode %d: %d chunks of %d bytes do not cover %d bytes", e.Nid, len(e.Chunks), e.ChunkSize, e.Size)
	}
	s := fmt.Sprintf("inode %d", e.Nid)
	exts := make([]Extent, len(e.Chunks))
	for k, c := range e.Chunks {
		fo := uint64(k) * e.ChunkSize
		exts[k] = Extent{FileOffset: fo, Length: min(e.ChunkSize, e.Size-fo), Blob: -1}
		if c.BlkAddr == NullBlkAddr {
			continue
		}
		if err := img.checkChunk(e, k, (e.inlineOff+7)&^7+uint64(k)*ChunkIndexSize, s); err != nil {
			return nil, err
		}
		exts[k].Blob = c.BlobIndex()
		exts[k].BlobOffset = uint64(c.BlkAddr) * uint64(img.BlockSize)
	}
	return exts, nil
}
