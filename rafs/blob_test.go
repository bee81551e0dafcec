package rafs

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"reflect"
	"sync"
	"testing"
	"testing/fstest"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

const (
	fixture22UncompressedSHA = "66c3387eb172d604c659d25771cf8979953613d89970f66264d435dbbc17c763"
	libRsSHA                 = "1810eba864521293bb0d6b55a3c82318d4d89f294ed761c456d9088a17de0c69"
	syncIoRsSHA              = "e629ab260ff0dc02a24648a3e0dd8c13a5daf233d535c330e3201925f5eeff96"
)

func fixture22BlobBytes(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(testutil.NydusFixture(t, fixture22Blob))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReadBlobChunksFixture(t *testing.T) {
	img := openFixture(t, fixture22)
	blob := fixture22BlobBytes(t)
	chunks, err := ReadBlobChunks(bytes.NewReader(blob), &img.Blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	want := []BlobChunk{
		{CompressedOffset: 0, CompressedSize: 4828, UncompressedOffset: 0, UncompressedSize: 16931, Flags: ChunkFlagCompressed},
		{CompressedOffset: 4828, CompressedSize: 2974, UncompressedOffset: 20480, UncompressedSize: 13400, Flags: ChunkFlagCompressed},
	}
	if !reflect.DeepEqual(chunks, want) {
		t.Errorf("chunks %+v\nwant %+v", chunks, want)
	}
	// The bootstrap chunk table agrees with the blob's own ci array.
	for _, c := range img.ChunkTable {
		bc := chunks[c.Index]
		if c.CompressedOffset != bc.CompressedOffset || c.CompressedSize != bc.CompressedSize ||
			c.UncompressedOffset != bc.UncompressedOffset || c.UncompressedSize != bc.UncompressedSize {
			t.Errorf("chunk table entry %+v disagrees with ci[%d] %+v", c, c.Index, bc)
		}
	}
}

func fixture22Uncompressed(t testing.TB) (*Image, *UncompressedReader) {
	img := openFixture(t, fixture22)
	blob := bytes.NewReader(fixture22BlobBytes(t))
	chunks, err := ReadBlobChunks(blob, &img.Blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	return img, NewUncompressedReader(blob, &img.Blobs[0], chunks)
}

func TestUncompressedReaderFixture(t *testing.T) {
	_, ur := fixture22Uncompressed(t)
	if ur.Size() != 36864 {
		t.Fatalf("Size = %d", ur.Size())
	}
	all := make([]byte, ur.Size())
	if n, err := ur.ReadAt(all, 0); n != len(all) || err != nil {
		t.Fatalf("ReadAt all = %d, %v", n, err)
	}
	if sum := sha256.Sum256(all); hex.EncodeToString(sum[:]) != fixture22UncompressedSHA {
		t.Errorf("sha256 of uncompressed space %x, want %s", sum, fixture22UncompressedSHA)
	}
	// Gaps between chunks and after the last one are zero.
	if !allZero(all[16931:20480]) || !allZero(all[20480+13400:]) {
		t.Error("gaps are not zero")
	}
	// Reads at every odd offset and length agree with the whole.
	for _, r := range [][2]int{{0, 1}, {16930, 2}, {16000, 5000}, {20479, 2}, {33879, 100}, {36863, 1}, {1, 36862}} {
		buf := make([]byte, r[1])
		n, err := ur.ReadAt(buf, int64(r[0]))
		if n != r[1] || err != nil || !bytes.Equal(buf, all[r[0]:r[0]+r[1]]) {
			t.Errorf("ReadAt(%d, %d) = %d, %v or wrong bytes", r[0], r[1], n, err)
		}
	}
	buf := make([]byte, 10)
	if n, err := ur.ReadAt(buf, 36860); n != 4 || err != io.EOF || !bytes.Equal(buf[:4], all[36860:]) {
		t.Errorf("ReadAt across the end = %d, %v", n, err)
	}
	if n, err := ur.ReadAt(buf, 36864); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end = %d, %v", n, err)
	}
	if _, err := ur.ReadAt(buf, -1); err == nil {
		t.Error("ReadAt(-1) succeeded")
	}
	// Concurrent readers see the same bytes.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := make([]byte, 4096)
			for off := g * 512; off+len(b) <= len(all); off += 4096 {
				if _, err := ur.ReadAt(b, int64(off)); err != nil || !bytes.Equal(b, all[off:off+len(b)]) {
					errs <- errors.New("concurrent read mismatch")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func TestFSFixture22(t *testing.T) {
	img, ur := fixture22Uncompressed(t)
	fsys := img.FS([]io.ReaderAt{ur})
	for name, want := range map[string]string{"lib.rs": libRsSHA, "sync_io.rs": syncIoRsSHA} {
		data, err := fs.ReadFile(fsys, name)
		if err != nil {
			t.Fatal(err)
		}
		if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != want {
			t.Errorf("%s sha256 %x, want %s", name, sum, want)
		}
		if !bytes.HasPrefix(data, []byte("// Copyright (C) 2020 Alibaba Cloud.")) {
			t.Errorf("%s starts with %q", name, data[:40])
		}
	}
	if err := fstest.TestFS(fsys, "lib.rs", "sync_io.rs"); err != nil {
		t.Fatal(err)
	}
	fi, err := fs.Stat(fsys, "lib.rs")
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := fi.Sys().(*Entry); !ok || e.Nid != 133 || fi.Size() != 16931 || fi.Mode() != 0o644 ||
		fi.ModTime().Unix() != 1676819553 || fi.ModTime().Nanosecond() != 628661334 {
		t.Errorf("Stat(lib.rs) = %v %v %v %v", fi.Sys(), fi.Size(), fi.Mode(), fi.ModTime())
	}
	if fi, err := fs.Stat(fsys, "."); err != nil || !fi.IsDir() || fi.Mode() != fs.ModeDir|0o755 {
		t.Errorf("Stat(.) = %v, %v", fi, err)
	}
	// Without blob readers the tree lists but file data cannot be read.
	bare := img.FS(nil)
	if ents, err := fs.ReadDir(bare, "."); err != nil || len(ents) != 2 {
		t.Errorf("ReadDir without blobs = %v, %v", ents, err)
	}
	if _, err := fs.ReadFile(bare, "lib.rs"); err == nil {
		t.Error("ReadFile without a blob reader succeeded")
	}
	for _, bad := range []string{"/lib.rs", "../x", "lib.rs/", ""} {
		if _, err := fsys.Open(bad); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Open(%q) error %v, want fs.ErrInvalid", bad, err)
		}
	}
	if _, err := fsys.Open("missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Open(missing) error %v", err)
	}
}

// zeroBlob serves size zero bytes, standing in for a blob that is not
// available (the snapshotter fixture's).
type zeroBlob struct{ size int64 }

func (z zeroBlob) ReadAt(p []byte, off int64) (int, error) {
	if off >= z.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), z.size-off))
	clear(p[:n])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func TestFSSnapshotterFixture(t *testing.T) {
	testutil.SkipShort(t)
	img := openFixture(t, fixtureSnap)
	fsys := img.FS([]io.ReaderAt{zeroBlob{int64(img.Blobs[0].UncompressedSize)}})
	if err := fstest.TestFS(fsys, "usr/bin/bash", "bin", "etc/passwd"); err != nil {
		t.Fatal(err)
	}
	target, err := fs.ReadLink(fsys, "bin")
	if err != nil || target != "usr/bin" {
		t.Errorf("ReadLink(bin) = %q, %v", target, err)
	}
	fi, err := fs.Lstat(fsys, "bin")
	if err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		t.Errorf("Lstat(bin) = %v, %v", fi, err)
	}
	data, err := fs.ReadFile(fsys, "bin/bash")
	if err != nil || len(data) != 1396520 || !allZero(data) {
		t.Errorf("ReadFile(bin/bash) = %d bytes, %v", len(data), err)
	}
}
