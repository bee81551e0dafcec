package rafs

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"math/bits"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// writerFixture is a hand-made tree over one uncompressed blob: what the
// writer needs from a builder, without a builder.
type writerFixture struct {
	root  *Node
	blobs []BlobInfo
	space []byte // the blob's uncompressed space
	files map[string][]byte
}

const wtChunk = 64 << 10

// newWriterFixture lays files into a blob at 4 KiB aligned offsets (like a
// directory build with compression none) and returns the tree.
func newWriterFixture(t *testing.T, bsBits uint8) *writerFixture {
	t.Helper()
	bs := uint64(1) << bsBits
	fx := &writerFixture{files: make(map[string][]byte)}
	var infos []ChunkInfo
	// addChunks appends data as chunks and returns their indexes.
	addChunks := func(data []byte) []ChunkIndex {
		var idx []ChunkIndex
		for off := 0; off < len(data); off += wtChunk {
			c := data[off:min(off+wtChunk, len(data))]
			uoff := uint64(len(fx.space))
			ci := uint32(len(infos))
			fx.space = append(fx.space, c...)
			fx.space = append(fx.space, make([]byte, int(wrRoundUp(int64(len(fx.space)), 4096))-len(fx.space))...)
			infos = append(infos, ChunkInfo{
				Digest: sha256.Sum256(c), CompressedSize: uint32(len(c)), UncompressedSize: uint32(len(c)),
				CompressedOffset: uoff, UncompressedOffset: uoff, Index: ci,
			})
			idx = append(idx, NewChunkIndex(0, ci, uint32(uoff/bs)))
		}
		return idx
	}
	pattern := func(n int, seed byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = seed + byte(i*7) + byte(i>>9)
		}
		return b
	}
	file := func(name string, data []byte, chunks []ChunkIndex) *Node {
		fx.files[name] = data
		return &Node{Name: name, Mode: 0o100644, Size: uint64(len(data)), Mtime: 1700000000, MtimeNsec: 5, Chunks: chunks}
	}

	contig := pattern(2*wtChunk+wtChunk/2, 1)
	small := pattern(100, 2)
	shared := pattern(wtChunk, 3)
	sharedIdx := addChunks(shared)
	nc := append(append([]byte{}, pattern(wtChunk, 4)...), shared...)
	ncIdx := append(addChunks(nc[:wtChunk]), sharedIdx...) // second chunk reused: not contiguous

	big := &Node{Name: "bigdir", Mode: 0o040755, Mtime: 1700000001}
	for i := range 400 {
		big.Children = append(big.Children, &Node{Name: fmt.Sprintf("entry-%03d-%s", i, strings.Repeat("z", i%23)), Mode: 0o120777, Target: "t"})
	}
	contigNode := file("contig", contig, addChunks(contig))
	fx.root = &Node{Mode: 0o040755, Mtime: 1700000002, Xattrs: map[string][]byte{"user.root": []byte("r")}, Children: []*Node{
		contigNode,
		file("small", small, addChunks(small)),
		file("empty", nil, nil),
		file("shared", shared, sharedIdx),
		file("noncontig", nc, ncIdx),
		{Name: "link-to-contig", Link: contigNode},
		{Name: "compact", Mode: 0o100600, UID: 7, GID: 8}, // mtime 0: compact inode
		{Name: "wide", Mode: 0o100600, UID: 70000, GID: 80000, Mtime: 0},
		{Name: "short", Mode: 0o120777, Target: "small"},
		{Name: "mid", Mode: 0o120777, Target: strings.Repeat("m/", 1500)},
		{Name: "long", Mode: 0o120777, Target: strings.Repeat("x/", 2045)},
		{Name: "chr", Mode: 0o020644, RdevMajor: 4, RdevMinor: 300},
		{Name: "fifo", Mode: 0o010600},
		{Name: "xattrs", Mode: 0o100644, Xattrs: map[string][]byte{
			"user.a": []byte("1"), "trusted.b": []byte("22"), "security.c": bytes.Repeat([]byte{9}, 1000),
		}},
		big,
	}}
	fx.blobs = []BlobInfo{{
		ID: strings.Repeat("ab", 32),
		Entry: BlobEntry{
			ChunkCount: uint32(len(infos)), Compressor: CompressNone, Features: BlobFeatureAligned,
			CompressedSize: uint64(len(fx.space)), UncompressedSize: uint64(len(fx.space)),
			CIOffset: uint64(len(fx.space)), CICompressedSize: uint64(16 * len(infos)), CIUncompressedSize: uint64(16 * len(infos)),
		},
		Chunks: infos,
	}}
	return fx
}

func (fx *writerFixture) write(t *testing.T, bsBits uint8) ([]byte, *WriteResult) {
	t.Helper()
	var buf bytes.Buffer
	res, err := WriteBootstrap(&buf, fx.root, fx.blobs, WriteOptions{BlockSizeBits: bsBits, ChunkSize: wtChunk, Compressor: CompressNone})
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), res
}

// wtLookup resolves a path in a bootstrap by reading directory blocks
// directly, independently of the package's reader.
func wtLookup(t *testing.T, boot []byte, path string) (Inode, uint64, int64) {
	t.Helper()
	var sb Superblock
	sb.Decode(boot[SuperblockOffset:])
	bs := int64(sb.BlockSize())
	nid := uint64(sb.RootNid)
	at := func(nid uint64) (Inode, int64) {
		off := int64(sb.MetaBlkAddr)*bs + int64(nid)*InodeSlotSize
		ino, err := DecodeInode(boot[off:])
		if err != nil {
			t.Fatal(err)
		}
		return ino, off
	}
	ino, off := at(nid)
	for _, name := range strings.Split(strings.Trim(path, "/"), "/") {
		if name == "" {
			break
		}
		data := make([]byte, ino.Size)
		full := int64(ino.Size) / bs * bs
		if ino.Layout() == LayoutFlatPlain {
			full = int64(ino.Size)
		}
		copy(data, boot[int64(ino.U)*bs:int64(ino.U)*bs+full])
		copy(data[full:], boot[off+int64(ino.SizeOnDisk()+ino.XattrSize()):])
		found := false
		for blk := int64(0); blk < int64(len(data)) && !found; blk += bs {
			b := data[blk:min(blk+bs, int64(len(data)))]
			var d Dirent
			d.Decode(b)
			n := int(d.NameOff) / DirentSize
			for i := range n {
				d.Decode(b[DirentSize*i:])
				end := len(b)
				if i+1 < n {
					var next Dirent
					next.Decode(b[DirentSize*(i+1):])
					end = int(next.NameOff)
				}
				if string(bytes.TrimRight(b[d.NameOff:end], "\x00")) == name {
					nid, found = d.Nid, true
					break
				}
			}
		}
		if !found {
			t.Fatalf("%s: %q not found", path, name)
		}
		ino, off = at(nid)
	}
	return ino, nid, off
}

func TestWriteBootstrapLayout(t *testing.T) {
	for _, bsBits := range []uint8{BlockSizeBitsDefault, BlockSizeBitsTarfs} {
		t.Run(fmt.Sprint(1<<bsBits), func(t *testing.T) {
			fx := newWriterFixture(t, bsBits)
			boot, res := fx.write(t, bsBits)
			bs := int64(1) << bsBits
			if len(boot)%MetaAlign != 0 || res.Size != int64(len(boot)) {
				t.Fatalf("size %d (reported %d) not 4 KiB aligned", len(boot), res.Size)
			}
			var sb Superblock
			sb.Decode(boot[SuperblockOffset:])
			var ext ExtSuperblock
			ext.Decode(boot[ExtSuperblockOffset:])
			var slot DeviceSlot
			slot.Decode(boot[DeviceSlotOffset:])
			if sb.Magic != ErofsMagic || sb.FeatureCompat != FeatureCompatRafsV6 || sb.FeatureIncompat != FeatureIncompatRafsV6 ||
				sb.DevtSlotOff != DevtSlotOff || sb.ExtraDevices != 1 || sb.RootNid == 0 || sb.BlkSzBits != bsBits {
				t.Errorf("superblock %+v", sb)
			}
			wantMapped := uint32(wrRoundUp(int64(len(boot)), 512<<10) / bs)
			if slot.MappedBlkAddr != wantMapped || slot.Blocks != uint32(int64(len(fx.space))/bs) || sb.Blocks != slot.Blocks {
				t.Errorf("slot %+v, sb blocks %d: want mapped %d, blocks %d", slot, sb.Blocks, wantMapped, len(fx.space)/int(bs))
			}
			wantFlags := uint64(FlagCompressionNone | FlagHashBlake3 | FlagExplicitUIDGID | FlagHasXattr)
			if ext.Flags != wantFlags || ext.BlobTableOffset != 4096 || ext.ChunkTableOffset%4096 != 0 || ext.ChunkSize != wtChunk {
				t.Errorf("ext superblock %+v", ext)
			}
			var e BlobEntry
			e.Decode(boot[ext.BlobTableOffset:])
			if e.BlobIndex != 0 || e.ChunkSize != wtChunk || string(e.BlobID[:]) != fx.blobs[0].ID {
				t.Errorf("blob entry %+v", e)
			}
			var prev ChunkInfo
			for i := range int(ext.ChunkTableSize / ChunkInfoSize) {
				var c ChunkInfo
				c.Decode(boot[ext.ChunkTableOffset+uint64(i*ChunkInfoSize):])
				if i > 0 && bytes.Compare(prev.Digest[:], c.Digest[:]) > 0 {
					t.Errorf("chunk table not sorted by digest at %d", i)
				}
				prev = c
			}

			chunkBits := func(path string) int {
				ino, _, _ := wtLookup(t, boot, path)
				if ino.Layout() != LayoutChunkBased || ino.U&ChunkFormatIndexes == 0 {
					t.Fatalf("%s: layout %d, i_u %#x", path, ino.Layout(), ino.U)
				}
				return int(ino.U&ChunkFormatBlkBitsMask) + int(bsBits)
			}
			if got, want := chunkBits("contig"), bits.Len64(uint64(len(fx.files["contig"]))-1); got != want {
				t.Errorf("contig: chunk bits %d, want next_pow2(size) = %d", got, want)
			}
			for _, p := range []string{"noncontig", "small", "shared"} {
				if got := chunkBits(p); got != 16 {
					t.Errorf("%s: chunk bits %d, want the superblock's 16", p, got)
				}
			}
			_, nidA, _ := wtLookup(t, boot, "contig")
			inoB, nidB, _ := wtLookup(t, boot, "link-to-contig")
			if nidA != nidB || inoB.Nlink != 2 {
				t.Errorf("hard link: nids %d/%d, nlink %d", nidA, nidB, inoB.Nlink)
			}
			if ino, _, _ := wtLookup(t, boot, "compact"); ino.Extended() || ino.UID != 7 {
				t.Errorf("compact: %+v", ino)
			}
			if ino, _, _ := wtLookup(t, boot, "wide"); !ino.Extended() || ino.UID != 70000 {
				t.Errorf("wide: %+v", ino)
			}
			if ino, _, _ := wtLookup(t, boot, "short"); ino.Layout() != LayoutFlatInline {
				t.Errorf("short symlink: layout %d", ino.Layout())
			}
			// 3000 bytes: inline after a compact inode in 4 KiB blocks,
			// five full blocks and an inline tail in 512 B blocks.
			if ino, _, off := wtLookup(t, boot, "mid"); ino.Layout() != LayoutFlatInline || ino.Size != 3000 ||
				(bs == 512) != (int64(ino.U) != off/bs) {
				t.Errorf("mid symlink: %+v at %d", ino, off)
			}
			// 4090 bytes: the tail never fits beside the inode.
			if ino, _, _ := wtLookup(t, boot, "long"); ino.Layout() != LayoutFlatPlain || ino.Size != 4090 {
				t.Errorf("long symlink: %+v", ino)
			}
			if ino, _, _ := wtLookup(t, boot, "chr"); ino.U != 300&0xFF|4<<8|(300&^0xFF)<<12 {
				t.Errorf("chr: i_u %#x", ino.U)
			}
			bigdir, _, off := wtLookup(t, boot, "bigdir")
			if bigdir.Size <= uint64(bs) || bigdir.Nlink != 2 {
				t.Errorf("bigdir: %+v", bigdir)
			}
			if bigdir.Layout() == LayoutFlatInline && off%bs+int64(bigdir.SizeOnDisk())+int64(bigdir.Size%uint64(bs)) > bs {
				t.Errorf("bigdir: inline tail crosses a block")
			}
			if root, _, _ := wtLookup(t, boot, "/"); root.Nlink != 3 {
				t.Errorf("root nlink %d, want 3", root.Nlink)
			}
			wtLookup(t, boot, "bigdir/entry-399-"+strings.Repeat("z", 399%23))

			// Same input, same bytes (xattrs come from maps).
			again, _ := fx.write(t, bsBits)
			if !bytes.Equal(boot, again) {
				t.Error("second write differs")
			}
		})
	}
}

// TestWriteBootstrapReader reads the written bootstrap back through the
// package's reader and its fs.FS view.
func TestWriteBootstrapReader(t *testing.T) {
	for _, bsBits := range []uint8{BlockSizeBitsDefault, BlockSizeBitsTarfs} {
		t.Run(fmt.Sprint(1<<bsBits), func(t *testing.T) {
			fx := newWriterFixture(t, bsBits)
			boot, _ := fx.write(t, bsBits)
			img, err := NewImage(bytes.NewReader(boot), int64(len(boot)))
			if err != nil {
				t.Fatalf("reader rejects the bootstrap: %v", err)
			}
			fsys := img.FS([]io.ReaderAt{bytes.NewReader(fx.space)})
			for name, want := range fx.files {
				got, err := fs.ReadFile(fsys, name)
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("%s: %d bytes, err %v; want %d bytes", name, len(got), err, len(want))
				}
			}
			n := 0
			if err := fs.WalkDir(fsys, ".", func(string, fs.DirEntry, error) error { n++; return nil }); err != nil {
				t.Fatal(err)
			}
			if n != 416 {
				t.Errorf("walked %d paths, want 416", n)
			}
		})
	}
}

// TestWriteBootstrapKernel mounts the fixture as a flat device.
func TestWriteBootstrapKernel(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "mount", "umount")
	for _, bsBits := range []uint8{BlockSizeBitsDefault, BlockSizeBitsTarfs} {
		t.Run(fmt.Sprint(1<<bsBits), func(t *testing.T) {
			fx := newWriterFixture(t, bsBits)
			boot, res := fx.write(t, bsBits)
			dir := t.TempDir()
			img := filepath.Join(dir, "flat.img")
			flat := append(boot, make([]byte, int64(res.Slots[0].MappedBlkAddr)<<bsBits-int64(len(boot)))...)
			flat = append(flat, fx.space...)
			if err := os.WriteFile(img, flat, 0o644); err != nil {
				t.Fatal(err)
			}
			mnt := testutil.MountErofs(t, img, "loop")
			for name, want := range fx.files {
				got, err := os.ReadFile(filepath.Join(mnt, name))
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("%s: %d bytes, err %v; want %d bytes", name, len(got), err, len(want))
				}
			}
			for name, want := range map[string]string{"long": strings.Repeat("x/", 2045), "mid": strings.Repeat("m/", 1500), "short": "small"} {
				if target, err := os.Readlink(filepath.Join(mnt, name)); err != nil || target != want {
					t.Errorf("symlink %s: %d bytes, err %v", name, len(target), err)
				}
			}
			ents, err := os.ReadDir(filepath.Join(mnt, "bigdir"))
			if err != nil || len(ents) != 400 {
				t.Errorf("bigdir: %d entries, err %v", len(ents), err)
			}
			var st1, st2 os.FileInfo
			st1, _ = os.Stat(filepath.Join(mnt, "contig"))
			st2, _ = os.Stat(filepath.Join(mnt, "link-to-contig"))
			if !os.SameFile(st1, st2) {
				t.Error("hard link is not the same inode")
			}
			var xattrs map[string][]byte
			for _, c := range fx.root.Children {
				if c.Name == "xattrs" {
					xattrs = c.Xattrs
				}
			}
			if len(xattrs) != 3 {
				t.Fatalf("fixture lost its xattrs: %v", xattrs)
			}
			for name, want := range xattrs {
				buf := make([]byte, 2048)
				n, err := unix.Lgetxattr(filepath.Join(mnt, "xattrs"), name, buf)
				if err != nil || !bytes.Equal(buf[:n], want) {
					t.Errorf("xattr %s: %q, %v", name, buf[:max(n, 0)], err)
				}
			}
		})
	}
}

func TestWriteBootstrapErrors(t *testing.T) {
	dir := func(kids ...*Node) *Node { return &Node{Mode: 0o040755, Children: kids} }
	reg := func(name string) *Node { return &Node{Name: name, Mode: 0o100644} }
	d := &Node{Name: "d", Mode: 0o040755}
	blob := []BlobInfo{{ID: "b", Entry: BlobEntry{ChunkCount: 1, UncompressedSize: 4096}}}
	cases := []struct {
		name  string
		root  *Node
		blobs []BlobInfo
		want  string
	}{
		{"root not a dir", reg("x"), nil, "root must be a directory"},
		{"duplicate", dir(reg("a"), reg("a")), nil, `"/a": duplicate name`},
		{"slash", dir(reg("a/b")), nil, "contains '/'"},
		{"dot", dir(reg("..")), nil, "invalid name"},
		{"long name", dir(reg(strings.Repeat("n", 256))), nil, "256 bytes"},
		{"dir twice", dir(d, &Node{Name: "e", Mode: 0o040755, Children: []*Node{d}}), nil, "directory already in the tree"},
		{"link to dir", dir(d, &Node{Name: "l", Link: d}), nil, "hard link to a directory"},
		{"xattr prefix", dir(&Node{Name: "x", Mode: 0o100644, Xattrs: map[string][]byte{"system.foo": nil}}), nil, `xattr "system.foo"`},
		{"symlink empty", dir(&Node{Name: "s", Mode: 0o120777}), nil, "symlink target"},
		{"symlink long", dir(&Node{Name: "s", Mode: 0o120777, Target: strings.Repeat("t", 4096)}), nil, "symlink target"},
		{"chunk count", dir(&Node{Name: "f", Mode: 0o100644, Size: 10}), nil, "0 chunks for 10 bytes"},
		{"chunk blob", dir(&Node{Name: "f", Mode: 0o100644, Size: 10, Chunks: []ChunkIndex{NewChunkIndex(1, 0, 0)}}), blob, "blob index 1"},
		{"chunk ci", dir(&Node{Name: "f", Mode: 0o100644, Size: 10, Chunks: []ChunkIndex{NewChunkIndex(0, 5, 0)}}), blob, "chunk-info index 5"},
		{"chunk range", dir(&Node{Name: "f", Mode: 0o100644, Size: 10, Chunks: []ChunkIndex{NewChunkIndex(0, 0, 1)}}), blob, "beyond blob"},
		{"bad type", dir(&Node{Name: "t", Mode: 0o0644}), nil, "unknown file type"},
		{"device", dir(&Node{Name: "c", Mode: 0o020644, RdevMajor: 5000}), nil, "does not fit"},
		{"nsec", dir(&Node{Name: "n", Mode: 0o100644, MtimeNsec: 1e9}), nil, "nanoseconds"},
		{"blob id", dir(), []BlobInfo{{ID: strings.Repeat("x", 65)}}, "1 to 64 bytes"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var buf bytes.Buffer
			_, err := WriteBootstrap(&buf, c.root, c.blobs, WriteOptions{})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err %v, want one containing %q", err, c.want)
			}
			if buf.Len() != 0 {
				t.Errorf("%d bytes written despite the error", buf.Len())
			}
		})
	}
}

func TestWriteBootstrapPrefetch(t *testing.T) {
	fx := newWriterFixture(t, BlockSizeBitsDefault)
	var small, link *Node
	for _, c := range fx.root.Children {
		switch c.Name {
		case "small":
			small = c
		case "link-to-contig":
			link = c
		}
	}
	var buf bytes.Buffer
	opts := WriteOptions{ChunkSize: wtChunk, Compressor: CompressNone, Prefetch: []*Node{small, link}}
	if _, err := WriteBootstrap(&buf, fx.root, fx.blobs, opts); err != nil {
		t.Fatal(err)
	}
	boot := buf.Bytes()
	var ext ExtSuperblock
	ext.Decode(boot[ExtSuperblockOffset:])
	if ext.PrefetchTableOffset != ext.BlobTableOffset+uint64(ext.BlobTableSize) || ext.PrefetchTableSize != 8 {
		t.Fatalf("prefetch table at %d, %d bytes", ext.PrefetchTableOffset, ext.PrefetchTableSize)
	}
	_, nidSmall, _ := wtLookup(t, boot, "small")
	_, nidContig, _ := wtLookup(t, boot, "contig")
	got := []uint32{le.Uint32(boot[ext.PrefetchTableOffset:]), le.Uint32(boot[ext.PrefetchTableOffset+4:])}
	if got[0] != uint32(nidSmall) || got[1] != uint32(nidContig) {
		t.Errorf("prefetch nids %v, want [%d %d]", got, nidSmall, nidContig)
	}
	if _, err := NewImage(bytes.NewReader(boot), int64(len(boot))); err != nil {
		t.Errorf("reader rejects a bootstrap with a prefetch table: %v", err)
	}
	opts.Prefetch = []*Node{{Name: "stranger", Mode: 0o100644}}
	if _, err := WriteBootstrap(io.Discard, fx.root, fx.blobs, opts); err == nil {
		t.Error("prefetch of a node outside the tree accepted")
	}
}

// TestWriteBootstrapKernelTwoBlobs mounts a flat device of two blobs: each
// blob's chunks must land at its own mapped_blkaddr.
func TestWriteBootstrapKernelTwoBlobs(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "mount", "umount")
	for _, bsBits := range []uint8{BlockSizeBitsDefault, BlockSizeBitsTarfs} {
		t.Run(fmt.Sprint(1<<bsBits), func(t *testing.T) {
			bs := 1 << bsBits
			var spaces [2][]byte
			var blobs []BlobInfo
			root := &Node{Mode: 0o040755}
			for bi := range 2 {
				data := bytes.Repeat([]byte{byte('a' + bi)}, 3*wtChunk+bi*1000+17)
				for i := range data {
					data[i] += byte(i / 4096)
				}
				var idx []ChunkIndex
				var infos []ChunkInfo
				for k := 0; k*wtChunk < len(data); k++ {
					c := data[k*wtChunk : min((k+1)*wtChunk, len(data))]
					idx = append(idx, NewChunkIndex(bi, uint32(k), uint32(k*wtChunk/bs)))
					infos = append(infos, ChunkInfo{Digest: sha256.Sum256(c), UncompressedSize: uint32(len(c)), UncompressedOffset: uint64(k * wtChunk), Index: uint32(k)})
				}
				spaces[bi] = append(data, make([]byte, int(wrRoundUp(int64(len(data)), 4096))-len(data))...)
				n := uint32(len(infos))
				blobs = append(blobs, BlobInfo{ID: fmt.Sprintf("%064d", bi), Chunks: infos, Entry: BlobEntry{
					ChunkCount: n, Features: BlobFeatureAligned, CompressedSize: uint64(len(spaces[bi])), UncompressedSize: uint64(len(spaces[bi])),
					CICompressedSize: uint64(16 * n), CIUncompressedSize: uint64(16 * n),
				}})
				root.Children = append(root.Children, &Node{Name: fmt.Sprintf("file%d", bi), Mode: 0o100644, Size: uint64(len(data)), Chunks: idx})
			}
			var buf bytes.Buffer
			res, err := WriteBootstrap(&buf, root, blobs, WriteOptions{BlockSizeBits: bsBits, ChunkSize: wtChunk})
			if err != nil {
				t.Fatal(err)
			}
			flat := buf.Bytes()
			for bi, s := range res.Slots {
				at := int(s.MappedBlkAddr) << bsBits
				if at < len(flat) || at%(512<<10) != 0 {
					t.Fatalf("blob %d mapped at byte %d, after %d bytes", bi, at, len(flat))
				}
				flat = append(flat, make([]byte, at-len(flat))...)
				flat = append(flat, spaces[bi][:int(s.Blocks)<<bsBits]...)
			}
			dir := t.TempDir()
			img := filepath.Join(dir, "flat.img")
			if err := os.WriteFile(img, flat, 0o644); err != nil {
				t.Fatal(err)
			}
			mnt := testutil.MountErofs(t, img, "loop")
			for bi := range 2 {
				got, err := os.ReadFile(filepath.Join(mnt, fmt.Sprintf("file%d", bi)))
				want := spaces[bi][:root.Children[bi].Size]
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("file%d: %d bytes, %v; want %d bytes", bi, len(got), err, len(want))
				}
			}
		})
	}
}
