package blobcache_test

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"io/fs"
	"os"
	"sort"
	"testing"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
)

// TestTarfsImage reads every file of a tarfs image (build.FromTar: the
// blob is the layer tar itself) through the cache, in 64 KiB units, and
// then again after a restart without touching the backend.
func TestTarfsImage(t *testing.T) {
	ctx := context.Background()
	files := writeTree(t, t.TempDir(), 3)
	var tarball bytes.Buffer
	tw := tar.NewWriter(&tarball)
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, dir := range []string{"big/", "small/"} {
		if err := tw.WriteHeader(&tar.Header{Name: dir, Typeflag: tar.TypeDir, Mode: 0o755}); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range names {
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(files[name]))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(files[name]); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	blobDir := t.TempDir()
	opts := build.DefaultOptions(blobDir)
	var boot bytes.Buffer
	res, err := build.FromTar(ctx, bytes.NewReader(tarball.Bytes()), &boot, opts)
	if err != nil {
		t.Fatal(err)
	}
	img, err := rafs.NewImage(bytes.NewReader(boot.Bytes()), int64(boot.Len()))
	if err != nil {
		t.Fatal(err)
	}
	if !img.Blobs[0].IsTarfs() {
		t.Fatalf("blob features %#x: not tarfs", img.Blobs[0].Features)
	}
	dir := t.TempDir()
	copts := &blobcache.Options{TarfsUnitSize: 64 << 10}
	for run := range 2 {
		cache, err := blobcache.Open(dir, copts)
		if err != nil {
			t.Fatal(err)
		}
		be, err := localfs.New(blobDir).Open(ctx, res.Blobs[0].ID)
		if err != nil {
			t.Fatal(err)
		}
		cb := &countingBackend{Backend: be}
		blob, err := cache.OpenBlob(ctx, backendStore{cb}, &img.Blobs[0], img.ChunkTable)
		if err != nil {
			t.Fatal(err)
		}
		fsys := img.FS([]io.ReaderAt{blob})
		for _, name := range names {
			got, err := fs.ReadFile(fsys, name)
			if err != nil || !bytes.Equal(got, files[name]) {
				t.Fatalf("run %d: %s: %v", run, name, err)
			}
		}
		st := blob.Stats()
		t.Logf("run %d: %d/%d units ready, %d backend requests, %d bytes (tar %d)", run, st.ReadyUnits, st.Units, cb.reads.Load(), cb.bytes.Load(), tarball.Len())
		if run == 1 && cb.reads.Load() != 0 {
			t.Errorf("after restart: %d backend requests", cb.reads.Load())
		}
		blob.Close()
		cache.Close()
	}
	// The cache file holds the tar bytes at their own offsets.
	var id string
	ents, _ := blobcache.List(dir)
	if len(ents) == 1 {
		id = ents[0].ID
	}
	data, err := os.ReadFile(dir + "/" + id + ".data")
	if err != nil || !bytes.Equal(data[:tarball.Len()], tarball.Bytes()) {
		t.Errorf("cache file differs from the tar: %v", err)
	}
}
