// Package localfs is the blobcache backend for a directory of blobs laid
// out as nydus does: one file per blob, named by its blob id.
package localfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/rafsnbd/rafsnbd/blobcache"
)

// Store is a directory of blob files.
type Store struct {
	dir string
}

var _ blobcache.Store = (*Store)(nil)

// New returns the store of blobs in dir. The directory is not read until a
// blob is opened.
func New(dir string) *Store { return &Store{dir: dir} }

// Dir is the blob directory.
func (s *Store) Dir() string { return s.dir }

// Open opens the blob file named blobID. The returned backend holds the
// file open until Close (blobcache.Blob closes its backend).
func (s *Store) Open(ctx context.Context, blobID string) (blobcache.Backend, error) {
	if err := blobcache.CheckBlobID(blobID); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	name := filepath.Join(s.dir, blobID)
	f, err := os.Open(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("localfs: %w: %s", blobcache.ErrNotFound, name)
		}
		return nil, fmt.Errorf("localfs: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("localfs: %w", err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("localfs: %s is not a regular file", name)
	}
	return &File{f: f, size: fi.Size()}, nil
}

// File is one blob file. Its size is taken when it is opened: blobs are
// immutable, so a file that changes later is an error the chunk digests
// will catch.
type File struct {
	f    *os.File
	size int64
}

// ReadAt reads stored blob bytes at off.
func (b *File) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	n, err := b.f.ReadAt(p, off)
	if err != nil && n < len(p) {
		return n, fmt.Errorf("localfs: %s: read %d bytes at %d: %w", b.f.Name(), len(p), off, err)
	}
	return n, nil
}

// Size is the blob file's size.
func (b *File) Size(context.Context) (int64, error) { return b.size, nil }

// MayStall is false: a local file answers at disk speed, so the NBD engine
// may serve reads of it inline instead of waking a handler.
func (b *File) MayStall() bool { return false }

// Close closes the file.
func (b *File) Close() error { return b.f.Close() }
