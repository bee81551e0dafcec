package rafs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sort"
	"strings"
	"testing"
	"testing/fstest"
)

// A test-only bootstrap builder, independent of the package's writer, for
// the constructs the fixtures lack: xattrs, compact inodes, special files,
// hard links, multi-block and plain-layout directories, small chunks, 512-byte
// tarfs blocks and deep nesting. erofs-utils cross-checks what it builds
// (reader_erofs_test.go), so the reader is not only checked against itself.

type synthNode struct {
	path    string // relative, "a/b"
	mode    uint16 // with type bits
	uid     uint32
	gid     uint32
	mtime   uint64
	nsec    uint32
	xattrs  []Xattr
	data    []byte // regular files
	target  string // symlinks
	rdev    uint32 // devices
	compact bool
	link    string // hard link to this earlier path (other fields ignored)
}

// The build time compact inodes' mtimes are relative to.
const (
	synthBuildTime     = 1_500_000_000
	synthBuildTimeNsec = 77
)

type synthOpts struct {
	tarfs      bool  // 512-byte blocks, TARFS_MODE, blob = raw bytes
	chunkBits  uint8 // per-inode chunk format bits
	inlineDirs bool  // FLAT_INLINE for directories that fit, else FLAT_PLAIN
}

type synthInode struct {
	node     *synthNode
	nid      uint64
	children []string // names, for directories
	parent   *synthInode
	dirData  []byte
	chunks   []ChunkIndex
	nlink    uint32
	xattrRaw []byte
}

func encodeXattrs(xs []Xattr) []byte {
	if len(xs) == 0 {
		return nil
	}
	b := make([]byte, XattrHeaderSize)
	for _, x := range xs {
		idx, suffix, ok := XattrIndex(x.Name)
		if !ok {
			panic("unrepresentable xattr " + x.Name)
		}
		var h [XattrEntrySize]byte
		(&XattrEntry{NameLen: uint8(len(suffix)), NameIndex: idx, ValueSize: uint16(len(x.Value))}).Encode(h[:])
		b = append(b, h[:]...)
		b = append(b, suffix...)
		b = append(b, x.Value...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
	}
	return b
}

// packDir lays out sorted names (with "." and "..") in blocks and returns
// the data, given each name's nid and type.
func packDir(bs int, names []string, nid func(string) uint64, ftype func(string) uint8) []byte {
	var data []byte
	for i := 0; i < len(names); {
		n, used := 0, 0
		for i+n < len(names) && DirentSize*(n+1)+used+len(names[i+n]) <= bs {
			used += len(names[i+n])
			n++
		}
		blk := make([]byte, 0, bs)
		nameOff := DirentSize * n
		for j := 0; j < n; j++ {
			var d [DirentSize]byte
			name := names[i+j]
			(&Dirent{Nid: nid(name), NameOff: uint16(nameOff), FileType: ftype(name)}).Encode(d[:])
			blk = append(blk, d[:]...)
			nameOff += len(name)
		}
		for j := 0; j < n; j++ {
			blk = append(blk, names[i+j]...)
		}
		i += n
		if i < len(names) {
			blk = append(blk, make([]byte, bs-len(blk))...)
		}
		data = append(data, blk...)
	}
	return data
}

func buildSynth(t testing.TB, opts synthOpts, nodes []synthNode) (boot, blob []byte) {
	t.Helper()
	bsBits := uint8(12)
	if opts.tarfs {
		bsBits = 9
	}
	bs := uint64(1) << bsBits
	const metaBase = 8192
	root := &synthNode{mode: ModeDir | 0o755}
	byPath := map[string]*synthInode{"": {node: root, nlink: 2}}
	order := []*synthInode{byPath[""]}
	for i := range nodes {
		n := &nodes[i]
		dir, name := "", n.path
		if j := strings.LastIndexByte(n.path, '/'); j >= 0 {
			dir, name = n.path[:j], n.path[j+1:]
		}
		parent := byPath[dir]
		if parent == nil {
			t.Fatalf("synth: parent of %s not listed first", n.path)
		}
		parent.children = append(parent.children, name)
		if n.link != "" {
			target := byPath[n.link]
			target.nlink++
			byPath[n.path] = target
			continue
		}
		in := &synthInode{node: n, parent: parent, nlink: 1}
		if n.mode&ModeTypeMask == ModeDir {
			in.nlink = 2
			parent.nlink++
		}
		byPath[n.path] = in
		order = append(order, in)
	}
	byPath[""].parent = byPath[""]

	// Blob: each file's chunks, bs aligned (4 KiB for non-tarfs: ALIGNED).
	align := uint64(4096)
	if opts.tarfs {
		align = 512
	}
	cs := bs << opts.chunkBits
	var ci uint32
	for _, in := range order {
		if in.node.mode&ModeTypeMask != ModeRegular {
			continue
		}
		for off := uint64(0); off < uint64(len(in.node.data)); off += cs {
			piece := in.node.data[off:min(off+cs, uint64(len(in.node.data)))]
			in.chunks = append(in.chunks, NewChunkIndex(0, ci, uint32(uint64(len(blob))/bs)))
			ci++
			blob = append(blob, piece...)
			for uint64(len(blob))%align != 0 {
				blob = append(blob, 0)
			}
		}
	}

	// Inode sizes, then nids: inode + xattrs + chunk indexes or inline tail.
	dirNames := func(in *synthInode) []string {
		names := append([]string{".", ".."}, in.children...)
		sort.Strings(names)
		return names
	}
	inlineTail := func(in *synthInode) []byte {
		switch in.node.mode & ModeTypeMask {
		case ModeSymlink:
			return []byte(in.node.target)
		case ModeDir:
			if opts.inlineDirs {
				d := packDir(int(bs), dirNames(in), func(string) uint64 { return 0 }, func(string) uint8 { return 0 })
				if uint64(len(d)) < bs {
					return d
				}
			}
		}
		return nil
	}
	pos := uint64(0)
	inodeSize := func(in *synthInode) uint64 {
		if in.node.compact {
			return CompactInodeSize
		}
		return ExtendedInodeSize
	}
	for _, in := range order {
		in.xattrRaw = encodeXattrs(in.node.xattrs)
		head := inodeSize(in) + uint64(len(in.xattrRaw))
		tail := uint64(len(inlineTail(in)))
		if tail > 0 && (metaBase+pos)%bs+head+tail > bs {
			pos = (metaBase+pos+bs-1)/bs*bs - metaBase
		}
		in.nid = pos / InodeSlotSize
		end := pos + head + tail
		if len(in.chunks) > 0 {
			end = (pos+head+7)&^7 + uint64(len(in.chunks))*ChunkIndexSize
		}
		pos = (end + 31) &^ 31
	}
	dataStart := (metaBase + pos + bs - 1) / bs * bs
	boot = make([]byte, dataStart)

	nidOf := func(dir *synthInode, name string) uint64 {
		switch name {
		case ".":
			return dir.nid
		case "..":
			return dir.parent.nid
		}
		p := name
		if dir.node.path != "" {
			p = dir.node.path + "/" + name
		}
		return byPath[p].nid
	}
	typeOf := func(dir *synthInode, name string) uint8 {
		switch name {
		case ".", "..":
			return FileTypeDir
		}
		p := name
		if dir.node.path != "" {
			p = dir.node.path + "/" + name
		}
		return FileTypeOf(uint32(byPath[p].node.mode))
	}
	for _, in := range order {
		n := in.node
		off := metaBase + in.nid*InodeSlotSize
		ino := Inode{Mode: n.mode, Nlink: in.nlink, UID: n.uid, GID: n.gid, Mtime: n.mtime, MtimeNsec: n.nsec, Ino: uint32(in.nid)}
		if !n.compact {
			ino.Format = InodeFormatExtended
		}
		ino.XattrCount = 0
		if len(in.xattrRaw) > 0 {
			ino.XattrCount = uint16((len(in.xattrRaw)-XattrHeaderSize)/4 + 1)
		}
		var tail []byte
		switch n.mode & ModeTypeMask {
		case ModeDir:
			in.dirData = packDir(int(bs), dirNames(in), func(s string) uint64 { return nidOf(in, s) }, func(s string) uint8 { return typeOf(in, s) })
			ino.Size = uint64(len(in.dirData))
			if t := inlineTail(in); t != nil {
				ino.Format |= LayoutFlatInline << 1
				ino.U = uint32(off / bs)
				tail = in.dirData
			} else {
				ino.Format |= LayoutFlatPlain << 1
				ino.U = uint32(uint64(len(boot)) / bs)
				boot = append(boot, in.dirData...)
				for uint64(len(boot))%bs != 0 {
					boot = append(boot, 0)
				}
			}
		case ModeSymlink:
			ino.Format |= LayoutFlatInline << 1
			ino.Size = uint64(len(n.target))
			ino.U = uint32(off / bs)
			tail = []byte(n.target)
		case ModeRegular:
			ino.Format |= LayoutChunkBased << 1
			ino.Size = uint64(len(n.data))
			ino.U = ChunkFormatIndexes | uint32(opts.chunkBits)
		default:
			ino.U = n.rdev
		}
		buf := make([]byte, ExtendedInodeSize)
		if err := ino.Encode(buf); err != nil {
			t.Fatal(err)
		}
		if n.compact {
			put32(buf, 12, uint32(n.mtime)) // mtime delta from the build time
		}
		p := off
		copy(boot[p:], buf[:ino.SizeOnDisk()])
		p += uint64(ino.SizeOnDisk())
		copy(boot[p:], in.xattrRaw)
		p += uint64(len(in.xattrRaw))
		copy(boot[p:], tail)
		p = (p + 7) &^ 7
		for _, c := range in.chunks {
			c.Encode(boot[p:])
			p += ChunkIndexSize
		}
	}
	for len(boot)%MetaAlign != 0 {
		boot = append(boot, 0)
	}
	usize := uint64(len(blob))
	sb := Superblock{Magic: ErofsMagic, FeatureCompat: FeatureCompatRafsV6, BlkSzBits: bsBits,
		RootNid: uint16(byPath[""].nid), Inos: uint64(len(order)), Blocks: uint32(usize / bs),
		BuildTime: synthBuildTime, BuildTimeNsec: synthBuildTimeNsec,
		MetaBlkAddr: uint32(metaBase / bs), FeatureIncompat: FeatureIncompatRafsV6, ExtraDevices: 1, DevtSlotOff: DevtSlotOff}
	sb.Encode(boot[SuperblockOffset:])
	flags := uint64(FlagCompressionNone | FlagHashBlake3 | FlagExplicitUIDGID | FlagHasXattr)
	features := uint32(BlobFeatureAligned)
	ciSize := uint64(ci) * CIv1EntrySize
	if opts.tarfs {
		flags = FlagCompressionNone | FlagHashSHA256 | FlagExplicitUIDGID | FlagHasXattr | FlagTarfsMode
		features = BlobFeatureTarfs | BlobFeatureCapTarTOC
		ciSize = 0
	}
	(&ExtSuperblock{Flags: flags, BlobTableOffset: 4096, BlobTableSize: BlobEntrySize, ChunkSize: 1 << 20}).Encode(boot[ExtSuperblockOffset:])
	var id [64]byte
	copy(id[:], fmt.Sprintf("%064x", usize))
	(&DeviceSlot{BlobID: id, Blocks: uint32(usize / bs), MappedBlkAddr: uint32(uint64(len(boot)) / bs)}).Encode(boot[DeviceSlotOffset:])
	(&BlobEntry{BlobID: id, ChunkSize: 1 << 20, ChunkCount: ci, Features: features, CompressedSize: usize,
		UncompressedSize: usize, CICompressedSize: ciSize, CIUncompressedSize: ciSize}).Encode(boot[4096:])
	return boot, blob
}

func synthTree() []synthNode {
	big := make([]byte, 3*4096+100)
	for i := range big {
		big[i] = byte(i * 31 % 251)
	}
	nodes := []synthNode{
		{path: "dev", mode: ModeDir | 0o755, mtime: 1700000000},
		{path: "dev/null", mode: ModeChar | 0o666, rdev: 1<<8 | 3},
		{path: "dev/sda", mode: ModeBlock | 0o660, rdev: 8 << 8, gid: 6},
		{path: "dev/fifo", mode: ModeFifo | 0o644, compact: true},
		{path: "dev/sock", mode: ModeSocket | 0o755},
		{path: "etc", mode: ModeDir | 0o755, uid: 0, gid: 0},
		{path: "etc/xattrs", mode: ModeRegular | 0o640, uid: 1234, gid: 5678, mtime: 1600000000, nsec: 123456789,
			data: []byte("xattr carrier\n"), xattrs: []Xattr{
				{Name: "user.comment", Value: []byte("hello")},
				{Name: "security.capability", Value: []byte{1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
				{Name: "trusted.overlay.opaque", Value: []byte("y")},
				{Name: "system.posix_acl_access", Value: []byte{2, 0, 0, 0}},
			}},
		{path: "etc/compact", mode: ModeRegular | 0o644, compact: true, uid: 7, gid: 8, mtime: 5, data: []byte("compact inode\n")},
		{path: "etc/hardlink", link: "etc/compact"},
		{path: "etc/empty", mode: ModeRegular | 0o600},
		{path: "etc/setuid", mode: ModeRegular | 0o4755, data: []byte("#!/bin/true\n")},
		{path: "big", mode: ModeRegular | 0o644, data: big},
		{path: "link", mode: ModeSymlink | 0o777, target: "etc/compact"},
		{path: "abs", mode: ModeSymlink | 0o777, target: "/etc"},
		{path: "loop", mode: ModeSymlink | 0o777, target: "../loop/x"},
		{path: "many", mode: ModeDir | 0o1777, xattrs: []Xattr{{Name: "user.dir", Value: []byte("x")}}},
	}
	for i := range 400 {
		nodes = append(nodes, synthNode{path: fmt.Sprintf("many/file-with-a-longish-name-%04d", i), mode: ModeRegular | 0o644, data: []byte(fmt.Sprint(i))})
	}
	return nodes
}

func TestSynthImages(t *testing.T) {
	for _, opts := range []synthOpts{
		{chunkBits: 0},
		{chunkBits: 8, inlineDirs: true},
		{tarfs: true, chunkBits: 3},
		{tarfs: true, chunkBits: 11, inlineDirs: true},
	} {
		t.Run(fmt.Sprintf("tarfs=%v,chunkbits=%d,inline=%v", opts.tarfs, opts.chunkBits, opts.inlineDirs), func(t *testing.T) {
			nodes := synthTree()
			boot, blob := buildSynth(t, opts, nodes)
			img, err := NewImage(bytes.NewReader(boot), int64(len(boot)))
			if err != nil {
				t.Fatal(err)
			}
			checkSynth(t, img, blob, opts, nodes)
		})
	}
}

func checkSynth(t *testing.T, img *Image, blob []byte, opts synthOpts, nodes []synthNode) {
	t.Helper()
	bs := uint64(img.BlockSize)
	var br io.ReaderAt = bytes.NewReader(blob)
	if opts.tarfs {
		// A tarfs blob is its own uncompressed space.
		chunks, err := ReadBlobChunks(br, &img.Blobs[0])
		if err != nil || chunks != nil {
			t.Fatalf("tarfs ReadBlobChunks = %v, %v", chunks, err)
		}
	}
	fsys := img.FS([]io.ReaderAt{br})
	byPath := map[string]*synthNode{}
	for i := range nodes {
		byPath["/"+nodes[i].path] = &nodes[i]
	}
	nids := map[string]uint64{}
	seen := 0
	err := img.Walk(func(p string, e *Entry) error {
		seen++
		nids[p] = e.Nid
		n := byPath[p]
		if p == "/" {
			return nil
		}
		if n == nil {
			t.Errorf("walked unexpected %s", p)
			return nil
		}
		if n.link != "" {
			if e.Nid != nids["/"+n.link] || e.Nlink != 2 {
				t.Errorf("%s: nid %d nlink %d, want the nid of %s and 2 links", p, e.Nid, e.Nlink, n.link)
			}
			return nil
		}
		wantMtime, wantNsec := n.mtime, n.nsec
		if n.compact {
			wantMtime, wantNsec = synthBuildTime+n.mtime, synthBuildTimeNsec
		}
		if e.Mode != n.mode || e.UID != n.uid || e.GID != n.gid || e.Mtime != wantMtime || e.MtimeNsec != wantNsec ||
			e.Rdev != n.rdev || e.Target != n.target || e.Inode.Extended() == n.compact {
			t.Errorf("%s: entry %+v does not match %+v", p, e, n)
		}
		if len(e.Xattrs) != len(n.xattrs) {
			t.Errorf("%s: xattrs %v, want %v", p, e.Xattrs, n.xattrs)
		}
		for i := range min(len(e.Xattrs), len(n.xattrs)) {
			if e.Xattrs[i].Name != n.xattrs[i].Name || !bytes.Equal(e.Xattrs[i].Value, n.xattrs[i].Value) {
				t.Errorf("%s: xattr %d = %q=%q, want %q=%q", p, i, e.Xattrs[i].Name, e.Xattrs[i].Value, n.xattrs[i].Name, n.xattrs[i].Value)
			}
		}
		if e.IsRegular() {
			if e.ChunkSize != bs<<opts.chunkBits {
				t.Errorf("%s: chunk size %d, want %d", p, e.ChunkSize, bs<<opts.chunkBits)
			}
			got, err := fs.ReadFile(fsys, p[1:])
			if err != nil || !bytes.Equal(got, n.data) {
				t.Errorf("%s: read %d bytes (%v), want %d", p, len(got), err, len(n.data))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(nodes)+1 {
		t.Errorf("walked %d entries, want %d", seen, len(nodes)+1)
	}
	many, err := img.Lookup("/many")
	if err != nil {
		t.Fatal(err)
	}
	if blocks := img.dirBlocks(many); blocks < 4 {
		t.Errorf("/many spans %d blocks; the test wants a multi-block directory", blocks)
	}
	for _, p := range []string{"many/file-with-a-longish-name-0000", "many/file-with-a-longish-name-0399", "many/file-with-a-longish-name-0200", "abs/compact", "link"} {
		if _, err := fs.Stat(fsys, p); err != nil {
			t.Errorf("Stat(%s): %v", p, err)
		}
	}
	if _, err := img.Lookup("/loop/y"); err == nil || !strings.Contains(err.Error(), "too many levels of symbolic links") {
		t.Errorf("Lookup through a symlink loop: %v", err)
	}
	if _, err := fs.Stat(fsys, "loop/y"); err == nil {
		t.Error("Stat through a symlink loop succeeded")
	}
	if _, err := fs.Stat(fsys, "many/file-with-a-longish-name-0400"); err == nil {
		t.Error("Stat of a missing name in a multi-block directory succeeded")
	}
	if err := fstest.TestFS(fsys, "etc/xattrs", "dev/null", "many/file-with-a-longish-name-0123", "big"); err != nil {
		t.Fatal(err)
	}
}

func TestWalkDepthLimit(t *testing.T) {
	var nodes []synthNode
	p := ""
	for i := range MaxDepth + 2 {
		if i > 0 {
			p += "/"
		}
		p += "d"
		nodes = append(nodes, synthNode{path: p, mode: ModeDir | 0o755})
	}
	boot, _ := buildSynth(t, synthOpts{inlineDirs: true}, nodes)
	img, err := NewImage(bytes.NewReader(boot), int64(len(boot)))
	if err != nil {
		t.Fatal(err)
	}
	err = img.Walk(func(string, *Entry) error { return nil })
	var fe *FormatError
	if !errors.As(err, &fe) || !strings.Contains(fe.Msg, "deeper than") {
		t.Errorf("Walk of %d nested directories: %v", MaxDepth+2, err)
	}
	// Lookup has no recursion and resolves it.
	if _, err := img.Lookup(p); err != nil {
		t.Errorf("Lookup of the deepest directory: %v", err)
	}
}
