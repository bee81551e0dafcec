package blobcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Backend reads the stored (possibly compressed) bytes of one blob: a file
// in a blob directory, a blob in an OCI registry, an object in a bucket.
// Implementations must be safe for concurrent use. ReadAt follows
// io.ReaderAt's contract (n < len(p) only with an error) and honours ctx.
type Backend interface {
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	Size(ctx context.Context) (int64, error)
}

// Store opens the Backend of a blob by its id (the blob table's blob id).
// localfs.Store and registry.Store are the two this module provides.
type Store interface {
	Open(ctx context.Context, blobID string) (Backend, error)
}

// ErrNotFound is wrapped by a Store's Open when the blob does not exist.
var ErrNotFound = errors.New("blob not found")

// CheckBlobID refuses ids that could not name a file in a blob or cache
// directory: the RAFS reader accepts letters, digits, '-', '_' and '.',
// and so does every store and the cache.
func CheckBlobID(id string) error {
	if id == "" || id == "." || id == ".." || len(id) > 64 {
		return fmt.Errorf("blobcache: invalid blob id %q", id)
	}
	if strings.IndexFunc(id, func(c rune) bool {
		return !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-' || c == '_' || c == '.')
	}) >= 0 {
		return fmt.Errorf("blobcache: invalid character in blob id %q", id)
	}
	return nil
}

// ReaderAt adapts a Backend to io.ReaderAt with a fixed context, for code
// that reads raw blob bytes (for example rafs.ReadBlobChunks).
func ReaderAt(ctx context.Context, b Backend) io.ReaderAt { return readerAt{ctx, b} }

type readerAt struct {
	ctx context.Context
	b   Backend
}

func (r readerAt) ReadAt(p []byte, off int64) (int, error) { return r.b.ReadAt(r.ctx, p, off) }
