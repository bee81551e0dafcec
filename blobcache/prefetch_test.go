package blobcache_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
)

// TestPrefetch maps a directory of a build.FromDir image to blob ranges,
// prefetches them in the background, and then reads those files without a
// single backend request.
func TestPrefetch(t *testing.T) {
	ctx := context.Background()
	src, blobDir := t.TempDir(), t.TempDir()
	files := writeTree(t, src, 2)
	var boot bytes.Buffer
	res, err := build.FromDir(ctx, src, &boot, build.DefaultOptions(blobDir))
	if err != nil {
		t.Fatal(err)
	}
	img, err := rafs.NewImage(bytes.NewReader(boot.Bytes()), int64(boot.Len()))
	if err != nil {
		t.Fatal(err)
	}
	ranges, err := blobcache.PrefetchRanges(img, []string{"/small"})
	if err != nil {
		t.Fatal(err)
	}
	var want, got int64
	for name, data := range files {
		if strings.HasPrefix(name, "small/") {
			want += int64(len(data))
		}
	}
	for _, r := range ranges[0] {
		got += r.Len
	}
	if len(ranges) != 1 || got < want || got > want+40*4096 {
		t.Fatalf("ranges for /small cover %d bytes in %d blobs; the files hold %d", got, len(ranges), want)
	}
	if _, err := blobcache.PrefetchRanges(img, []string{"/small/none"}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing path: %v", err)
	}

	be, err := localfs.New(blobDir).Open(ctx, res.Blobs[0].ID)
	if err != nil {
		t.Fatal(err)
	}
	cb := &countingBackend{Backend: be}
	cache := openCache(t, t.TempDir(), nil)
	blob, err := cache.OpenBlob(ctx, backendStore{cb}, &img.Blobs[0], img.ChunkTable)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	blob.Prefetch(ranges[0]...)
	if err := blob.WaitPrefetch(ctx); err != nil {
		t.Fatal(err)
	}
	if st := blob.Stats(); st.PrefetchErrors != 0 || st.ReadyUnits == 0 {
		t.Fatalf("after prefetch: %+v", st)
	}
	before := cb.reads.Load()
	fsys := img.FS([]io.ReaderAt{blob})
	for name, data := range files {
		if !strings.HasPrefix(name, "small/") {
			continue
		}
		b, err := fs.ReadFile(fsys, name)
		if err != nil || !bytes.Equal(b, data) {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if n := cb.reads.Load() - before; n != 0 {
		t.Errorf("reading prefetched files made %d backend requests", n)
	}

	// PrefetchAll while foreground readers work: both finish, all correct.
	var wg sync.WaitGroup
	blob.PrefetchAll()
	for name, data := range files {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if b, err := fs.ReadFile(fsys, filepath.ToSlash(name)); err != nil || !bytes.Equal(b, data) {
				t.Errorf("%s: %v", name, err)
			}
		}()
	}
	wg.Wait()
	if err := blob.WaitPrefetch(ctx); err != nil {
		t.Fatal(err)
	}
	if st := blob.Stats(); st.ReadyUnits != int64(st.Units) {
		t.Errorf("after PrefetchAll: %d of %d units ready", st.ReadyUnits, st.Units)
	}
}
