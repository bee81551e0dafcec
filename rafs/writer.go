package rafs

import (
	"bytes"
	"cmp"
	"fmt"
	"io"
	"math/bits"
	"slices"
	"strings"
)

// The bootstrap writer: lays out an in-memory tree as a RAFS v6 bootstrap
// (spec §13). The layout is a pure function of the tree, the blob list and
// the options, so equal inputs give byte-identical bootstraps.

const (
	// wrMappedAlign is the alignment of each blob's first block in the flat
	// device (§4: roundup(pos, 512 KiB)).
	wrMappedAlign = 512 << 10
)

// Node is one entry of the tree a bootstrap is written from. A Node is an
// inode plus the name it has in its parent; extra names of the same inode
// (hard links) are Nodes whose Link points at it.
type Node struct {
	Name string // base name in the parent; ignored for the root

	// Mode is st_mode: the S_IF* file type bits and the permission bits
	// including setuid, setgid and sticky.
	Mode      uint32
	UID, GID  uint32
	Mtime     int64  // seconds since the epoch
	MtimeNsec uint32 // nanoseconds, < 1e9

	// Size is the byte size of a regular file. Directories and symlinks
	// are sized by the writer; other types have size 0.
	Size uint64

	// RdevMajor and RdevMinor are the device numbers of character and
	// block devices.
	RdevMajor, RdevMinor uint32

	Target string            // symlink target, stored verbatim
	Xattrs map[string][]byte // extended attributes by full name

	// Link, when set, makes this Node another name for Link's inode; every
	// other field of this Node but Name is then ignored. Link need not be
	// in the tree itself (it may have been replaced by a later entry) and
	// must not be a directory or itself a link.
	Link *Node

	// Chunks locates a regular file's data, one entry per chunk of
	// ChunkSize bytes (the last one shorter): blob index, chunk-info index
	// in that blob and block address in the blob's uncompressed space, as
	// NewChunkIndex packs them.
	Chunks []ChunkIndex
	// ChunkSize is the size the Chunks are cut at. 0 means the bootstrap's
	// chunk size, and lets the writer record next_pow2(Size) instead when
	// every chunk follows the previous one in the same blob (§8), so that
	// EROFS maps the file as one extent.
	ChunkSize uint64

	Children []*Node // directory entries, in any order
}

// WriteOptions are the bootstrap-wide settings.
type WriteOptions struct {
	// BlockSizeBits is the EROFS block size: 12 (4 KiB, the default) or 9
	// (512 B, required by tarfs, whose blobs are tars).
	BlockSizeBits uint8
	// ChunkSize is the superblock chunk size: a power of two from 4 KiB to
	// 16 MiB; 0 means 1 MiB. Every blob shares it.
	ChunkSize uint32
	// Compressor and Digester name the blobs' algorithms in the extended
	// superblock flags.
	Compressor Compressor
	Digester   Digester
	// Tarfs marks the image as tarfs (blobs are raw tars).
	Tarfs bool
	// Prefetch lists inodes whose nids go into the prefetch table.
	Prefetch []*Node
}

// BlobInfo describes one data blob: its blob-table entry and the chunks it
// contributes to the bootstrap chunk table. The writer fills the entry's
// BlobID, BlobIndex and ChunkSize and the chunks' BlobIndex; the device
// slot is derived from the entry.
type BlobInfo struct {
	ID     string // blob id, at most 64 ASCII bytes (sha256 hex by convention)
	Entry  BlobEntry
	Chunks []ChunkInfo
}

// WriteResult reports what WriteBootstrap laid out.
type WriteResult struct {
	Size        int64  // bootstrap bytes written (a multiple of 4096)
	Inodes      uint64 // distinct inodes
	RootNid     uint64
	MetaBlkAddr uint32
	// Slots are the device slots as written, one per blob: blocks and
	// mapped_blkaddr give each blob's place in the flat device.
	Slots []DeviceSlot
}

// WriteBootstrap writes the bootstrap for root (a directory) and blobs to
// w. It validates the tree and reports the first problem with the path of
// the entry concerned; nothing is written unless the whole layout succeeds.
func WriteBootstrap(w io.Writer, root *Node, blobs []BlobInfo, opts WriteOptions) (*WriteResult, error) {
	l, err := newWrLayout(root, blobs, opts)
	if err != nil {
		return nil, err
	}
	img, err := l.encode()
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(img); err != nil {
		return nil, fmt.Errorf("rafs: writing bootstrap: %w", err)
	}
	res := &WriteResult{
		Size:        int64(len(img)),
		Inodes:      uint64(len(l.inodes)),
		RootNid:     l.inodes[0].nid,
		MetaBlkAddr: uint32(l.metaStart >> l.bsBits),
		Slots:       l.slots,
	}
	return res, nil
}

// wrInode is one inode being laid out.
type wrInode struct {
	n      *Node
	path   string // first path it was reached by, for error messages
	parent *wrInode
	nlink  uint32

	extended bool
	xattrs   []byte // encoded inline xattr area
	xcount   uint16
	layout   uint16
	size     uint64

	dirents   []wrDirent
	dirBlocks [][2]int // [start, end) dirent index ranges per block

	chunkFmt uint16
	chunks   []ChunkIndex

	pos     int64 // byte offset of the inode
	nid     uint64
	blkaddr uint32 // i_u of directories and symlinks
}

type wrDirent struct {
	name  string
	ino   *wrInode
	ftype uint8
}

func (wi *wrInode) typ() uint32 { return wi.n.Mode & ModeTypeMask }

func (wi *wrInode) inodeSize() int64 {
	if wi.extended {
		return ExtendedInodeSize
	}
	return CompactInodeSize
}

// head is the inode plus its inline xattrs.
func (wi *wrInode) head() int64 { return wi.inodeSize() + int64(len(wi.xattrs)) }

type wrLayout struct {
	opts      WriteOptions
	bsBits    uint
	bs        int64
	blobs     []BlobInfo
	inodes    []*wrInode // BFS order, root first
	byNode    map[*Node]*wrInode
	hasXattr  bool
	prefetch  []*wrInode
	blobTable int64 // offset
	metaStart int64
	metaEnd   int64
	ctOffset  int64
	chunkTbl  []ChunkInfo
	total     int64
	slots     []DeviceSlot
}

func newWrLayout(root *Node, blobs []BlobInfo, opts WriteOptions) (*wrLayout, error) {
	if opts.BlockSizeBits == 0 {
		opts.BlockSizeBits = BlockSizeBitsDefault
		if opts.Tarfs {
			opts.BlockSizeBits = BlockSizeBitsTarfs
		}
	}
	if opts.BlockSizeBits != BlockSizeBitsDefault && opts.BlockSizeBits != BlockSizeBitsTarfs {
		return nil, fmt.Errorf("rafs: block size bits %d: want 9 or 12", opts.BlockSizeBits)
	}
	if opts.ChunkSize == 0 {
		opts.ChunkSize = 1 << 20
	}
	if cs := opts.ChunkSize; cs&(cs-1) != 0 || cs < MinChunkSize || cs > MaxChunkSize {
		return nil, fmt.Errorf("rafs: chunk size %d: want a power of two from 4 KiB to 16 MiB", cs)
	}
	if opts.Compressor.Flag() == 0 {
		return nil, fmt.Errorf("rafs: unsupported compressor %v", opts.Compressor)
	}
	if opts.Digester != DigestBlake3 && opts.Digester != DigestSHA256 {
		return nil, fmt.Errorf("rafs: unsupported digester %v", opts.Digester)
	}
	if len(blobs) > MaxBlobs {
		return nil, fmt.Errorf("rafs: %d blobs, at most %d fit a bootstrap", len(blobs), MaxBlobs)
	}
	if root == nil || root.Link != nil || root.Mode&ModeTypeMask != ModeDir {
		return nil, fmt.Errorf("rafs: the root must be a directory")
	}
	l := &wrLayout{
		opts:   opts,
		bsBits: uint(opts.BlockSizeBits),
		bs:     1 << opts.BlockSizeBits,
		blobs:  blobs,
		byNode: make(map[*Node]*wrInode),
	}
	for i, b := range blobs {
		if b.ID == "" || len(b.ID) > 64 {
			return nil, fmt.Errorf("rafs: blob %d: id %q must be 1 to 64 bytes", i, b.ID)
		}
		if b.Entry.UncompressedSize>>l.bsBits > 0xFFFF_FFFF {
			return nil, fmt.Errorf("rafs: blob %s: %d bytes exceed 2^32 blocks", b.ID, b.Entry.UncompressedSize)
		}
		if b.Entry.ChunkCount > MaxCIIndex+1 {
			return nil, fmt.Errorf("rafs: blob %s: %d chunks exceed 2^24", b.ID, b.Entry.ChunkCount)
		}
	}
	if err := l.collect(root); err != nil {
		return nil, err
	}
	for _, p := range opts.Prefetch {
		if p != nil && p.Link != nil {
			p = p.Link
		}
		wi, ok := l.byNode[p]
		if !ok {
			return nil, fmt.Errorf("rafs: prefetch entry is not in the tree")
		}
		l.prefetch = append(l.prefetch, wi)
	}
	if err := l.place(); err != nil {
		return nil, err
	}
	return l, nil
}

// collect walks the tree breadth first, which is the order inodes are laid
// out in, and computes everything that does not depend on positions.
func (l *wrLayout) collect(root *Node) error {
	rw := &wrInode{n: root, path: "/"}
	rw.parent = rw
	if err := l.prepare(rw); err != nil {
		return err
	}
	l.byNode[root] = rw
	l.inodes = append(l.inodes, rw)
	for i := 0; i < len(l.inodes); i++ {
		d := l.inodes[i]
		if d.typ() != ModeDir {
			continue
		}
		kids := slices.Clone(d.n.Children)
		slices.SortFunc(kids, func(a, b *Node) int { return strings.Compare(a.Name, b.Name) })
		d.dirents = append(make([]wrDirent, 0, len(kids)+2),
			wrDirent{name: ".", ino: d, ftype: FileTypeDir},
			wrDirent{name: "..", ino: d.parent, ftype: FileTypeDir})
		subdirs := 0
		for k, kid := range kids {
			if kid == nil {
				return fmt.Errorf("rafs: %s: nil child", d.path)
			}
			path := wrJoinPath(d.path, kid.Name)
			if err := wrCheckName(kid.Name); err != nil {
				return fmt.Errorf("rafs: %q: %w", path, err)
			}
			if k > 0 && kids[k-1].Name == kid.Name {
				return fmt.Errorf("rafs: %q: duplicate name", path)
			}
			target := kid
			if kid.Link != nil {
				target = kid.Link
				if target.Link != nil {
					return fmt.Errorf("rafs: %q: hard link to a hard link; link to its target", path)
				}
				if target.Mode&ModeTypeMask == ModeDir {
					return fmt.Errorf("rafs: %q: hard link to a directory", path)
				}
			}
			wi, seen := l.byNode[target]
			if seen && wi.typ() == ModeDir {
				return fmt.Errorf("rafs: %q: directory already in the tree at %q", path, wi.path)
			}
			if !seen {
				wi = &wrInode{n: target, path: path, parent: d}
				if err := l.prepare(wi); err != nil {
					return err
				}
				l.byNode[target] = wi
				l.inodes = append(l.inodes, wi)
			}
			if wi.typ() == ModeDir {
				subdirs++
			} else {
				wi.nlink++
			}
			d.dirents = append(d.dirents, wrDirent{name: kid.Name, ino: wi, ftype: FileTypeOf(target.Mode)})
		}
		d.nlink = uint32(2 + subdirs)
		slices.SortFunc(d.dirents, func(a, b wrDirent) int { return strings.Compare(a.name, b.name) })
		d.size, d.dirBlocks = l.packDirents(d.dirents)
	}
	// Compact inodes take their mtime from the superblock's build time,
	// which is 0: only inodes whose mtime is exactly 0 and whose fields fit
	// may be compact, so no timestamp is ever lost.
	for _, wi := range l.inodes {
		n := wi.n
		wi.extended = n.Mtime != 0 || n.MtimeNsec != 0 || n.UID > 0xFFFF || n.GID > 0xFFFF ||
			wi.nlink > 0xFFFF || wi.size > 0xFFFF_FFFF
	}
	return nil
}

// prepare validates an inode and encodes the parts that depend on it
// alone: xattrs, symlink size, chunk indexes.
func (l *wrLayout) prepare(wi *wrInode) error {
	n := wi.n
	if n.MtimeNsec >= 1e9 {
		return fmt.Errorf("rafs: %q: mtime nanoseconds %d out of range", wi.path, n.MtimeNsec)
	}
	if n.Mode > 0xFFFF {
		return fmt.Errorf("rafs: %q: mode %#o does not fit 16 bits", wi.path, n.Mode)
	}
	xa, xc, err := wrEncodeXattrs(n.Xattrs)
	if err != nil {
		return fmt.Errorf("rafs: %q: %w", wi.path, err)
	}
	wi.xattrs, wi.xcount = xa, xc
	if xc > 0 {
		l.hasXattr = true
	}
	switch wi.typ() {
	case ModeDir:
		// sized once its entries are known
	case ModeSymlink:
		if n.Target == "" || len(n.Target) > MaxSymlinkSize {
			return fmt.Errorf("rafs: %q: symlink target must be 1 to %d bytes, got %d", wi.path, MaxSymlinkSize, len(n.Target))
		}
		wi.size = uint64(len(n.Target))
	case ModeRegular:
		wi.size = n.Size
		wi.layout = LayoutChunkBased
		if err := l.prepareChunks(wi); err != nil {
			return fmt.Errorf("rafs: %q: %w", wi.path, err)
		}
	case ModeChar, ModeBlock:
		if n.RdevMajor > 0xFFF || n.RdevMinor > 0xF_FFFF {
			return fmt.Errorf("rafs: %q: device %d:%d does not fit EROFS' 32-bit rdev", wi.path, n.RdevMajor, n.RdevMinor)
		}
	case ModeFifo, ModeSocket:
	default:
		return fmt.Errorf("rafs: %q: unknown file type in mode %#o", wi.path, n.Mode)
	}
	return nil
}

// prepareChunks checks a regular file's chunk list against the blobs and
// picks the chunk size recorded in the inode (§8).
func (l *wrLayout) prepareChunks(wi *wrInode) error {
	n := wi.n
	sbChunk := uint64(l.opts.ChunkSize)
	chunk := n.ChunkSize
	if chunk == 0 {
		chunk = sbChunk
	}
	if chunk&(chunk-1) != 0 || chunk < uint64(l.bs) {
		return fmt.Errorf("chunk size %d: want a power of two of at least one block", chunk)
	}
	want := (n.Size + chunk - 1) / chunk
	if uint64(len(n.Chunks)) != want {
		return fmt.Errorf("%d chunks for %d bytes at chunk size %d, want %d", len(n.Chunks), n.Size, chunk, want)
	}
	for k, c := range n.Chunks {
		bi := c.BlobIndex()
		if bi < 0 || bi >= len(l.blobs) {
			return fmt.Errorf("chunk %d: blob index %d, image has %d blobs", k, bi, len(l.blobs))
		}
		e := &l.blobs[bi].Entry
		if c.CIIndex() >= e.ChunkCount {
			return fmt.Errorf("chunk %d: chunk-info index %d, blob %s has %d chunks", k, c.CIIndex(), l.blobs[bi].ID, e.ChunkCount)
		}
		clen := min(chunk, n.Size-uint64(k)*chunk)
		if uint64(c.BlkAddr)<<l.bsBits+clen > e.UncompressedSize {
			return fmt.Errorf("chunk %d: blocks %d+%d beyond blob %s (%d bytes)", k, c.BlkAddr, clen, l.blobs[bi].ID, e.UncompressedSize)
		}
	}
	if n.ChunkSize == 0 && len(n.Chunks) > 1 && wrContiguous(n.Chunks, uint32(sbChunk>>l.bsBits)) {
		// One extent for the whole file: the kernel reads chunk index 0
		// only and maps next_pow2(size) bytes from its block.
		if c := uint64(1) << bits.Len64(n.Size-1); bits.TrailingZeros64(c)-int(l.bsBits) <= ChunkFormatBlkBitsMask {
			chunk = c
		}
	}
	cbits := bits.TrailingZeros64(chunk) - int(l.bsBits)
	if cbits > ChunkFormatBlkBitsMask {
		return fmt.Errorf("chunk size %d too large for %d-byte blocks", chunk, l.bs)
	}
	wi.chunkFmt = ChunkFormatIndexes | uint16(cbits)
	wi.chunks = n.Chunks
	return nil
}

// wrContiguous reports whether every chunk follows the previous one in the
// same blob, step blocks apart.
func wrContiguous(cs []ChunkIndex, step uint32) bool {
	for k := 1; k < len(cs); k++ {
		if cs[k].BlobIndex() != cs[0].BlobIndex() || uint64(cs[k].BlkAddr) != uint64(cs[0].BlkAddr)+uint64(k)*uint64(step) {
			return false
		}
	}
	return true
}

// packDirents splits sorted entries into blocks (a name never crosses a
// block) and returns the directory size: full blocks count whole, the last
// one up to the end of its last name.
func (l *wrLayout) packDirents(ds []wrDirent) (uint64, [][2]int) {
	var blocks [][2]int
	start, used := 0, int64(0)
	for i, d := range ds {
		need := int64(DirentSize + len(d.name))
		if used+need > l.bs {
			blocks = append(blocks, [2]int{start, i})
			start, used = i, 0
		}
		used += need
	}
	blocks = append(blocks, [2]int{start, len(ds)})
	return uint64(len(blocks)-1)*uint64(l.bs) + uint64(used), blocks
}

// place assigns byte positions: inodes from the meta area's start, then the
// full data blocks of directories and symlinks, then the chunk table.
func (l *wrLayout) place() error {
	n := int64(len(l.blobs))
	l.blobTable = wrRoundUp(DeviceSlotOffset+DeviceSlotSize*n, MetaAlign)
	end := l.blobTable + BlobEntrySize*n + 4*int64(len(l.prefetch))
	l.metaStart = wrRoundUp(end, MetaAlign)
	// nid 0 stays unused: the kernel reports nids as inode numbers and
	// readdir skips entries whose inode number is 0.
	pos := l.metaStart + InodeSlotSize
	for _, wi := range l.inodes {
		pos = wrRoundUp(pos, InodeSlotSize)
		head := wi.head()
		switch wi.typ() {
		case ModeDir, ModeSymlink:
			tail := int64(wi.size % uint64(l.bs))
			if tail > 0 && head+tail <= l.bs {
				wi.layout = LayoutFlatInline
				if pos%l.bs+head+tail > l.bs { // inode and tail share one block
					pos = wrRoundUp(pos, l.bs)
				}
				wi.pos = pos
				pos += head + tail
			} else {
				wi.layout = LayoutFlatPlain
				wi.pos = pos
				pos += head
			}
		case ModeRegular:
			wi.pos = pos
			pos = wrRoundUp(pos+head, ChunkIndexSize) + ChunkIndexSize*int64(len(wi.chunks))
		default:
			wi.pos = pos
			pos += head
		}
		wi.nid = uint64(wi.pos-l.metaStart) / InodeSlotSize
	}
	if root := l.inodes[0]; root.nid > 0xFFFF {
		return fmt.Errorf("rafs: root nid %d does not fit 16 bits", root.nid)
	}
	data := wrRoundUp(pos, l.bs)
	for _, wi := range l.inodes {
		if wi.typ() != ModeDir && wi.typ() != ModeSymlink {
			continue
		}
		nblk := int64(wi.size) >> l.bsBits // full blocks; the tail is inline
		if wi.layout == LayoutFlatPlain {
			nblk = (int64(wi.size) + l.bs - 1) >> l.bsBits
		}
		if nblk == 0 {
			// Nothing outside the inode; like nydus, point at the
			// inode's own block.
			wi.blkaddr = uint32(wi.pos >> l.bsBits)
			continue
		}
		if data>>l.bsBits > 0xFFFF_FFFF {
			return fmt.Errorf("rafs: metadata exceeds 2^32 blocks")
		}
		wi.blkaddr = uint32(data >> l.bsBits)
		data += nblk << l.bsBits
	}
	l.metaEnd = data

	for bi, b := range l.blobs {
		for _, c := range b.Chunks {
			c.BlobIndex = uint32(bi)
			l.chunkTbl = append(l.chunkTbl, c)
		}
	}
	slices.SortFunc(l.chunkTbl, func(a, b ChunkInfo) int {
		if c := bytes.Compare(a.Digest[:], b.Digest[:]); c != 0 {
			return c
		}
		return cmp.Or(cmp.Compare(a.BlobIndex, b.BlobIndex), cmp.Compare(a.Index, b.Index))
	})
	l.total = wrRoundUp(l.metaEnd, MetaAlign)
	if len(l.chunkTbl) > 0 {
		l.ctOffset = l.total
		l.total = wrRoundUp(l.ctOffset+ChunkInfoSize*int64(len(l.chunkTbl)), MetaAlign)
	}

	next := l.total
	for _, b := range l.blobs {
		mapped := wrRoundUp(next, wrMappedAlign) >> l.bsBits
		blocks := int64(b.Entry.UncompressedSize >> l.bsBits)
		if mapped+blocks > 0xFFFF_FFFF {
			return fmt.Errorf("rafs: blob %s: flat device exceeds 2^32 blocks", b.ID)
		}
		var s DeviceSlot
		copy(s.BlobID[:], b.ID)
		s.Blocks = uint32(blocks)
		s.MappedBlkAddr = uint32(mapped)
		l.slots = append(l.slots, s)
		next = (mapped + blocks) << l.bsBits
	}
	return nil
}

func (l *wrLayout) encode() ([]byte, error) {
	img := make([]byte, l.total)
	var blocks uint64
	for _, s := range l.slots {
		blocks += uint64(s.Blocks)
	}
	if blocks > 0xFFFF_FFFF {
		return nil, fmt.Errorf("rafs: %d data blocks overflow the superblock", blocks)
	}
	sb := Superblock{
		Magic:           ErofsMagic,
		FeatureCompat:   FeatureCompatRafsV6,
		BlkSzBits:       uint8(l.bsBits),
		RootNid:         uint16(l.inodes[0].nid),
		Inos:            uint64(len(l.inodes)),
		Blocks:          uint32(blocks),
		MetaBlkAddr:     uint32(l.metaStart >> l.bsBits),
		FeatureIncompat: FeatureIncompatRafsV6,
		ExtraDevices:    uint16(len(l.blobs)),
		DevtSlotOff:     DevtSlotOff,
	}
	sb.Encode(img[SuperblockOffset:])

	flags := l.opts.Compressor.Flag() | l.opts.Digester.Flag() | FlagExplicitUIDGID
	if l.hasXattr {
		flags |= FlagHasXattr
	}
	if l.opts.Tarfs {
		flags |= FlagTarfsMode
	}
	ext := ExtSuperblock{
		Flags:           flags,
		BlobTableOffset: uint64(l.blobTable),
		BlobTableSize:   uint32(BlobEntrySize * len(l.blobs)),
		ChunkSize:       l.opts.ChunkSize,
	}
	if len(l.chunkTbl) > 0 {
		ext.ChunkTableOffset = uint64(l.ctOffset)
		ext.ChunkTableSize = uint64(ChunkInfoSize * len(l.chunkTbl))
	}
	if len(l.prefetch) > 0 {
		ext.PrefetchTableOffset = uint64(l.blobTable) + uint64(ext.BlobTableSize)
		ext.PrefetchTableSize = uint32(4 * len(l.prefetch))
		for i, wi := range l.prefetch {
			if wi.nid > 0xFFFF_FFFF {
				return nil, fmt.Errorf("rafs: prefetch %q: nid %d exceeds 32 bits", wi.path, wi.nid)
			}
			le.PutUint32(img[int(ext.PrefetchTableOffset)+4*i:], uint32(wi.nid))
		}
	}
	ext.Encode(img[ExtSuperblockOffset:])

	for i, b := range l.blobs {
		l.slots[i].Encode(img[DeviceSlotOffset+DeviceSlotSize*i:])
		e := b.Entry
		e.BlobID = [64]byte{}
		copy(e.BlobID[:], b.ID)
		e.BlobIndex = uint32(i)
		e.ChunkSize = l.opts.ChunkSize
		e.Encode(img[l.blobTable+int64(BlobEntrySize*i):])
	}

	for _, wi := range l.inodes {
		if err := l.encodeInode(img, wi); err != nil {
			return nil, err
		}
	}
	for i, c := range l.chunkTbl {
		c.Encode(img[l.ctOffset+int64(ChunkInfoSize*i):])
	}
	return img, nil
}

func (l *wrLayout) encodeInode(img []byte, wi *wrInode) error {
	n := wi.n
	format := wi.layout << 1
	if wi.extended {
		format |= InodeFormatExtended
	}
	ino := Inode{
		Format:     format,
		XattrCount: wi.xcount,
		Mode:       uint16(n.Mode),
		Nlink:      wi.nlink,
		Size:       wi.size,
		Ino:        uint32(wi.nid),
		UID:        n.UID,
		GID:        n.GID,
		Mtime:      uint64(n.Mtime),
		MtimeNsec:  n.MtimeNsec,
	}
	switch wi.typ() {
	case ModeDir, ModeSymlink:
		ino.U = wi.blkaddr
	case ModeRegular:
		ino.U = uint32(wi.chunkFmt)
	case ModeChar, ModeBlock:
		ino.U = EncodeRdev(n.RdevMajor, n.RdevMinor)
	}
	if err := ino.Encode(img[wi.pos:]); err != nil {
		return fmt.Errorf("rafs: %q: %w", wi.path, err)
	}
	tailPos := wi.pos + wi.inodeSize()
	copy(img[tailPos:], wi.xattrs)
	tailPos += int64(len(wi.xattrs))

	switch wi.typ() {
	case ModeRegular:
		p := wrRoundUp(tailPos, ChunkIndexSize)
		for _, c := range wi.chunks {
			c.Encode(img[p:])
			p += ChunkIndexSize
		}
	case ModeSymlink:
		l.placeData(img, wi, tailPos, []byte(n.Target))
	case ModeDir:
		body := make([]byte, wi.size)
		for bi, r := range wi.dirBlocks {
			l.encodeDirBlock(body[int64(bi)<<l.bsBits:], wi.dirents[r[0]:r[1]])
		}
		l.placeData(img, wi, tailPos, body)
	}
	return nil
}

// placeData copies an inode's data (wi.size bytes) to its final place: full
// blocks from blkaddr, the tail right after the inode when inline.
func (l *wrLayout) placeData(img []byte, wi *wrInode, inlinePos int64, body []byte) {
	full := int64(len(body)) >> l.bsBits << l.bsBits
	if wi.layout == LayoutFlatPlain {
		full = int64(len(body))
	}
	copy(img[int64(wi.blkaddr)<<l.bsBits:], body[:full])
	if wi.layout == LayoutFlatInline {
		copy(img[inlinePos:], body[full:])
	}
}

// encodeDirBlock writes one directory block's entries and names into b.
func (l *wrLayout) encodeDirBlock(b []byte, ds []wrDirent) {
	nameOff := DirentSize * len(ds)
	for i, d := range ds {
		de := Dirent{Nid: d.ino.nid, NameOff: uint16(nameOff), FileType: d.ftype}
		de.Encode(b[DirentSize*i:])
		nameOff += copy(b[nameOff:], d.name)
	}
}

// wrEncodeXattrs encodes the inline xattr area (§9) in name order and
// returns it with its i_xattr_icount.
func wrEncodeXattrs(m map[string][]byte) ([]byte, uint16, error) {
	if len(m) == 0 {
		return nil, 0, nil
	}
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	slices.Sort(names)
	b := make([]byte, XattrHeaderSize)
	for _, name := range names {
		idx, suffix, ok := XattrIndex(name)
		if !ok {
			return nil, 0, fmt.Errorf("xattr %q: EROFS stores only user., trusted., security. and POSIX ACL xattrs", name)
		}
		v := m[name]
		if len(suffix) > 255 || len(v) > 0xFFFF {
			return nil, 0, fmt.Errorf("xattr %q: name suffix %d bytes (max 255) or value %d bytes (max 65535)", name, len(suffix), len(v))
		}
		var h [XattrEntrySize]byte
		(&XattrEntry{NameLen: uint8(len(suffix)), NameIndex: idx, ValueSize: uint16(len(v))}).Encode(h[:])
		b = append(b, h[:]...)
		b = append(b, suffix...)
		b = append(b, v...)
		b = append(b, make([]byte, int(wrRoundUp(int64(len(b)), XattrEntrySize))-len(b))...)
	}
	count := (len(b)-XattrHeaderSize)/XattrEntrySize + 1
	if count > 0xFFFF {
		return nil, 0, fmt.Errorf("xattrs take %d bytes, more than an inode can hold", len(b))
	}
	return b, uint16(count), nil
}

func wrCheckName(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return fmt.Errorf("invalid name %q", name)
	case len(name) > MaxNameLen:
		return fmt.Errorf("name is %d bytes, EROFS allows %d", len(name), MaxNameLen)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("name contains '/' or NUL")
	}
	return nil
}

func wrJoinPath(dir, name string) string {
	if dir == "/" {
		return "/" + name
	}
	return dir + "/" + name
}

func wrRoundUp(v, align int64) int64 { return (v + align - 1) / align * align }
