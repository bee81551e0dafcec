package rafs

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

const (
	fixture22     = "rafs-v6-2.2.boot"
	fixture22Blob = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
	fixtureSnap   = "snapshotter-v6-bootstrap-chunk-pos-438272.boot"
	snapBlobID    = "cdde6f5645daea414d60bc75611102a8bc8dae6198f087366365d6ff85bf5726"
)

func openFixture(t testing.TB, name string) *Image {
	t.Helper()
	img, err := Open(testutil.NydusFixture(t, name))
	if err != nil {
		t.Fatalf("Open(%s): %v", name, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func TestFixture22Superblock(t *testing.T) {
	img := openFixture(t, fixture22)
	sb := img.Superblock
	want := Superblock{
		Magic: 0xE0F5E1E2, FeatureCompat: 0x40000000, BlkSzBits: 12, RootNid: 128, Inos: 3, Blocks: 9,
		MetaBlkAddr: 2, FeatureIncompat: 0x0C, ExtraDevices: 1, DevtSlotOff: 11,
	}
	if sb != want {
		t.Errorf("superblock = %+v\nwant %+v", sb, want)
	}
	ext := img.ExtSuperblock
	if ext.Flags != 0x194 || ext.BlobTableOffset != 4096 || ext.BlobTableSize != 256 || ext.ChunkSize != 1<<20 ||
		ext.ChunkTableOffset != 16384 || ext.ChunkTableSize != 160 || ext.PrefetchTableOffset != 0 || ext.PrefetchTableSize != 0 {
		t.Errorf("ext superblock = %+v", ext)
	}
	if img.BlockSize != 4096 || img.Size != 20480 || img.IsTarfs() || img.Compressor() != CompressZstd || img.Digester() != DigestBlake3 {
		t.Errorf("BlockSize %d Size %d tarfs %v compressor %v digester %v", img.BlockSize, img.Size, img.IsTarfs(), img.Compressor(), img.Digester())
	}
	if len(img.DeviceSlots) != 1 {
		t.Fatalf("%d device slots", len(img.DeviceSlots))
	}
	if d := img.DeviceSlots[0]; d.ID() != fixture22Blob || d.Blocks != 9 || d.MappedBlkAddr != 512 {
		t.Errorf("device slot = %q blocks %d mapped %d", d.ID(), d.Blocks, d.MappedBlkAddr)
	}
	if len(img.Blobs) != 1 {
		t.Fatalf("%d blobs", len(img.Blobs))
	}
	b := img.Blobs[0]
	if b.ID() != fixture22Blob || b.BlobIndex != 0 || b.ChunkSize != 1<<20 || b.ChunkCount != 2 ||
		b.Compressor != CompressZstd || b.Digester != DigestBlake3 || b.Features != 0x70000021 ||
		b.CompressedSize != 14554 || b.UncompressedSize != 36864 || b.CIOffset != 8314 ||
		b.CICompressedSize != 32 || b.CIUncompressedSize != 32 || b.CICompressor != CompressNone || b.TOCSize != 1024 {
		t.Errorf("blob entry = %+v", b)
	}
	// The ToC digest is the sha256 of the blob's last blob_toc_size bytes.
	blob, err := os.ReadFile(testutil.NydusFixture(t, fixture22Blob))
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(blob[len(blob)-int(b.TOCSize):]); sum != b.TOCDigest {
		t.Errorf("toc digest %x, sha256 of blob tail %x", b.TOCDigest, sum)
	}
	if !strings.HasPrefix(hex.EncodeToString(b.TOCDigest[:]), "cfc89ed0") || !strings.HasSuffix(hex.EncodeToString(b.TOCDigest[:]), "acde") {
		t.Errorf("toc digest %x, want cfc89ed0…acde", b.TOCDigest)
	}
	if len(img.ChunkTable) != 2 {
		t.Fatalf("chunk table has %d entries", len(img.ChunkTable))
	}
	// Sorted by digest; match them to ci indexes and the blob's ci array.
	byIndex := map[uint32]ChunkInfo{}
	for _, c := range img.ChunkTable {
		byIndex[c.Index] = c
	}
	c0, c1 := byIndex[0], byIndex[1]
	if c0.UncompressedOffset != 0 || c0.UncompressedSize != 16931 || c0.CompressedOffset != 0 || c0.CompressedSize != 4828 ||
		!strings.HasPrefix(hex.EncodeToString(c0.Digest[:]), "f7e2735f") {
		t.Errorf("chunk 0 = %+v", c0)
	}
	if c1.UncompressedOffset != 20480 || c1.UncompressedSize != 13400 || c1.CompressedOffset != 4828 || c1.CompressedSize != 2974 ||
		!strings.HasPrefix(hex.EncodeToString(c1.Digest[:]), "812465bc") {
		t.Errorf("chunk 1 = %+v", c1)
	}
	if img.PrefetchTable != nil {
		t.Errorf("prefetch table %v, want none", img.PrefetchTable)
	}
}

type walked struct {
	path             string
	nid              uint64
	ino              uint32
	mode             uint16
	size             uint64
	mtime            uint64
	nsec             uint32
	chunks           []ChunkIndex
	chunkSize        uint64
	uid, gid, layout uint32
}

func TestFixture22Tree(t *testing.T) {
	img := openFixture(t, fixture22)
	var got []walked
	err := img.Walk(func(p string, e *Entry) error {
		got = append(got, walked{p, e.Nid, e.Ino, e.Mode, e.Size, e.Mtime, e.MtimeNsec, e.Chunks, e.ChunkSize, e.UID, e.GID, uint32(e.Inode.Layout())})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []walked{
		{"/", 128, 0, 0o40755, 67, 0, 0, nil, 0, 0, 0, LayoutFlatInline},
		{"/lib.rs", 133, 2, 0o100644, 16931, 1676819553, 628661334, []ChunkIndex{NewChunkIndex(0, 0, 0)}, 1 << 20, 0, 0, LayoutChunkBased},
		{"/sync_io.rs", 136, 3, 0o100644, 13400, 1676819553, 628993084, []ChunkIndex{NewChunkIndex(0, 1, 5)}, 1 << 20, 0, 0, LayoutChunkBased},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("walk:\n got %+v\nwant %+v", got, want)
	}
	root, err := img.Inode(128)
	if err != nil {
		t.Fatal(err)
	}
	if root.Inode.U != 3 || !root.Inode.Extended() || root.Nlink != 2 {
		t.Errorf("root i_u %d extended %v nlink %d", root.Inode.U, root.Inode.Extended(), root.Nlink)
	}
	ents, err := img.ReadDir(128)
	if err != nil {
		t.Fatal(err)
	}
	wantEnts := []DirEntry{{"lib.rs", 133, FileTypeReg}, {"sync_io.rs", 136, FileTypeReg}}
	if !reflect.DeepEqual(ents, wantEnts) {
		t.Errorf("ReadDir(128) = %v, want %v", ents, wantEnts)
	}
	e, err := img.Lookup("/sync_io.rs")
	if err != nil {
		t.Fatal(err)
	}
	c := e.Chunks[0]
	if c.BlobIndex() != 0 || c.CIIndex() != 1 || c.BlkAddr != 5 {
		t.Errorf("sync_io.rs chunk = blob %d ci %d blk %d", c.BlobIndex(), c.CIIndex(), c.BlkAddr)
	}
	exts, err := img.FileExtents(e)
	if err != nil {
		t.Fatal(err)
	}
	if want := []Extent{{FileOffset: 0, Length: 13400, Blob: 0, BlobOffset: 20480}}; !reflect.DeepEqual(exts, want) {
		t.Errorf("FileExtents = %+v, want %+v", exts, want)
	}
	for _, p := range []string{"lib.rs", "/lib.rs", "./lib.rs", "//lib.rs", "/lib.rs/../lib.rs"} {
		if e, err := img.Lookup(p); err != nil || e.Nid != 133 {
			t.Errorf("Lookup(%q) = %v, %v", p, e, err)
		}
	}
	if e, err := img.Lookup("/"); err != nil || e.Nid != 128 {
		t.Errorf("Lookup(/) = %v, %v", e, err)
	}
	for _, p := range []string{"nope", "/lib.rs/x", "LIB.RS", "/x/../lib.rs"} {
		if _, err := img.Lookup(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Lookup(%q) error %v, want fs.ErrNotExist", p, err)
		}
	}
}

func TestSnapshotterFixtureWalk(t *testing.T) {
	img := openFixture(t, fixtureSnap)
	sb := img.Superblock
	if sb.Inos != 3517 || sb.Blocks != 4096 || sb.RootNid != 128 || sb.MetaBlkAddr != 2 || sb.ExtraDevices != 1 {
		t.Errorf("superblock %+v", sb)
	}
	if img.ExtSuperblock.Flags != 0x6 || img.ExtSuperblock.PrefetchTableOffset != 4352 || img.ExtSuperblock.ChunkTableOffset != 438272 || img.ExtSuperblock.ChunkTableSize != 201200 {
		t.Errorf("ext superblock %+v", img.ExtSuperblock)
	}
	if !reflect.DeepEqual(img.PrefetchTable, []uint32{142}) {
		t.Errorf("prefetch table %v, want [142]", img.PrefetchTable)
	}
	if len(img.ChunkTable) != 2515 {
		t.Errorf("chunk table has %d entries, want 2515", len(img.ChunkTable))
	}
	d, b := img.DeviceSlots[0], img.Blobs[0]
	if d.ID() != snapBlobID || d.Blocks != 20451 || d.MappedBlkAddr != 0 {
		t.Errorf("device slot %q blocks %d mapped %d", d.ID(), d.Blocks, d.MappedBlkAddr)
	}
	if b.ID() != snapBlobID || b.Compressor != CompressLZ4Block || b.Digester != DigestBlake3 || b.Features != BlobFeatureAligned ||
		b.ChunkCount != 2515 || b.CompressedSize != 43090887 || b.UncompressedSize != 83767296 ||
		b.CIOffset != 43090887 || b.CICompressor != CompressLZ4Block || b.CICompressedSize != 35949 || b.CIUncompressedSize != 40240 {
		t.Errorf("blob %+v", b)
	}
	counts := map[uint16]int{}
	total := 0
	var paths []string
	var chunkSizes = map[uint64]int{}
	err := img.Walk(func(p string, e *Entry) error {
		total++
		counts[e.Mode&ModeTypeMask]++
		paths = append(paths, p)
		if e.IsRegular() {
			chunkSizes[e.ChunkSize]++
		}
		if !e.Inode.Extended() {
			t.Errorf("%s: compact inode", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if total != 3517 || counts[ModeDir] != 678 || counts[ModeRegular] != 2627 || counts[ModeSymlink] != 212 {
		t.Errorf("walked %d entries: %d dirs, %d files, %d symlinks; want 3517, 678, 2627, 212",
			total, counts[ModeDir], counts[ModeRegular], counts[ModeSymlink])
	}
	if len(chunkSizes) != 1 || chunkSizes[1<<20] != 2627 {
		t.Errorf("file chunk sizes %v, want every one 1 MiB", chunkSizes)
	}
	// Deterministic order: a second walk yields the same paths.
	i := 0
	if err := img.Walk(func(p string, e *Entry) error {
		if i >= len(paths) || paths[i] != p {
			t.Fatalf("second walk differs at %d: %q", i, p)
		}
		i++
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	bash, err := img.Lookup("/usr/bin/bash")
	if err != nil {
		t.Fatal(err)
	}
	if bash.Size != 1396520 || bash.ChunkSize != 1<<20 ||
		!reflect.DeepEqual(bash.Chunks, []ChunkIndex{NewChunkIndex(0, 122, 263), NewChunkIndex(0, 123, 519)}) {
		t.Errorf("/usr/bin/bash size %d chunk size %d chunks %+v", bash.Size, bash.ChunkSize, bash.Chunks)
	}
	exts, err := img.FileExtents(bash)
	if err != nil {
		t.Fatal(err)
	}
	want := []Extent{{0, 1 << 20, 0, 263 * 4096}, {1 << 20, 1396520 - 1<<20, 0, 519 * 4096}}
	if !reflect.DeepEqual(exts, want) {
		t.Errorf("bash extents %+v, want %+v", exts, want)
	}
	// setuid/setgid bits (erofs-utils 1.5 cannot show them; the raw
	// i_mode bytes say 0104755 and 0102755).
	for p, mode := range map[string]uint16{"/usr/bin/passwd": 0o104755, "/usr/sbin/unix_chkpwd": 0o102755} {
		if e, err := img.Lookup(p); err != nil || e.Mode != mode {
			t.Errorf("%s: mode %#o (%v), want %#o", p, e.Mode, err, mode)
		} else if fm := e.FileMode(); fm&(fs.ModeSetuid|fs.ModeSetgid) == 0 {
			t.Errorf("%s: FileMode %v lacks setuid/setgid", p, fm)
		}
	}
	// /bin is a symlink to usr/bin: followed in the middle, not at the end.
	bin, err := img.Lookup("/bin")
	if err != nil || !bin.IsSymlink() || bin.Target != "usr/bin" {
		t.Fatalf("Lookup(/bin) = %+v, %v", bin, err)
	}
	viaLink, err := img.Lookup("/bin/bash")
	if err != nil || viaLink.Nid != bash.Nid {
		t.Errorf("Lookup(/bin/bash) = %v, %v; want nid %d", viaLink, err, bash.Nid)
	}
}

func TestSkipDirAndSkipAll(t *testing.T) {
	img := openFixture(t, fixtureSnap)
	var n int
	err := img.Walk(func(p string, e *Entry) error {
		n++
		if e.IsDir() && p != "/" {
			return fs.SkipDir
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ents, _ := img.ReadDir(img.RootNid())
	if n != len(ents)+1 {
		t.Errorf("SkipDir on every subdirectory visited %d entries, want %d", n, len(ents)+1)
	}
	n = 0
	if err := img.Walk(func(p string, e *Entry) error {
		n++
		if n == 10 {
			return fs.SkipAll
		}
		return nil
	}); err != nil || n != 10 {
		t.Errorf("SkipAll: %d entries, %v", n, err)
	}
	sentinel := errors.New("stop")
	if err := img.Walk(func(string, *Entry) error { return sentinel }); err != sentinel {
		t.Errorf("Walk returned %v, want the callback's error", err)
	}
}

func BenchmarkWalkSnapshotter(b *testing.B) {
	img := openFixture(b, fixtureSnap)
	b.ResetTimer()
	for b.Loop() {
		n := 0
		if err := img.Walk(func(string, *Entry) error { n++; return nil }); err != nil || n != 3517 {
			b.Fatal(n, err)
		}
	}
}

func BenchmarkLookupSnapshotter(b *testing.B) {
	img := openFixture(b, fixtureSnap)
	b.ResetTimer()
	for b.Loop() {
		if _, err := img.Lookup("/usr/lib/x86_64-linux-gnu/perl-base/unicore/lib/XIDS/Y.pl"); err != nil {
			b.Fatal(err)
		}
	}
}

// The metadata page cache returns the underlying bytes for reads at any
// offset and length, across page boundaries, under eviction and
// concurrency.
func TestMetaCache(t *testing.T) {
	data := make([]byte, 2<<20+1000) // more pages than the cache holds, a short last page
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	c := newMetaCache(bytes.NewReader(data), int64(len(data)))
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 5))
			for range 5000 {
				n := r.IntN(3 * metaPageSize)
				if g == 0 {
					n = r.IntN(8 * metaPageSize) // some bypass the cache
				}
				off := r.Int64N(int64(len(data) - n + 1))
				buf := make([]byte, n)
				if err := c.readAt(buf, off); err != nil || !bytes.Equal(buf, data[off:off+int64(n)]) {
					errs <- fmt.Sprintf("readAt(%d, %d): %v or wrong bytes", off, n, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if c.lru.Len() > metaCachePages || len(c.pages) != c.lru.Len() {
		t.Errorf("cache holds %d pages (%d in the map), limit %d", c.lru.Len(), len(c.pages), metaCachePages)
	}
}
