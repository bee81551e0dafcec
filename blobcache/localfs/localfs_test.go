package localfs_test

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
)

func TestLocalfs(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "abc123"), []byte("0123456789"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "adir"), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s := localfs.New(dir)
	be, err := s.Open(ctx, "abc123")
	if err != nil {
		t.Fatal(err)
	}
	defer be.(io.Closer).Close()
	if n, err := be.Size(ctx); n != 10 || err != nil {
		t.Errorf("Size = %d, %v", n, err)
	}
	p := make([]byte, 4)
	if n, err := be.ReadAt(ctx, p, 3); n != 4 || err != nil || string(p) != "3456" {
		t.Errorf("ReadAt = %d, %v, %q", n, err, p)
	}
	if n, err := be.ReadAt(ctx, p, 8); n != 2 || !errors.Is(err, io.EOF) {
		t.Errorf("ReadAt across the end = %d, %v", n, err)
	}
	if _, err := s.Open(ctx, "missing"); !errors.Is(err, blobcache.ErrNotFound) {
		t.Errorf("missing blob: %v", err)
	}
	for _, bad := range []string{"../abc123", "a/b", "", "..", "adir"} {
		if _, err := s.Open(ctx, bad); err == nil {
			t.Errorf("Open(%q) succeeded", bad)
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := be.ReadAt(cctx, p, 0); !errors.Is(err, context.Canceled) {
		t.Errorf("read with a cancelled context: %v", err)
	}
}
