package mounter

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"github.com/rafsnbd/rafsnbd/verity"
)

// VerifyBuilt builds a dm-verity tree over dev in memory (reading all of
// it once) and returns a device that checks every read against it, with
// the root hash. It guards the bytes served later against changes after
// the start (a cache file or blob modified under the mount); it cannot
// vouch for the bytes read while building.
func VerifyBuilt(ctx context.Context, dev Device, blockSize int) (*verity.Reader, error) {
	p := verity.NydusParams(uint64(dev.Size()), blockSize)
	p.Compat = verity.Standard
	tree, err := verity.Build(ctx, readerAt{dev}, p, nil)
	if err != nil {
		return nil, fmt.Errorf("verity tree: %w", err)
	}
	return verity.NewTreeReader(readerAt{dev}, tree)
}

// ErrNoTree says a disk has no dm-verity tree appended.
var ErrNoTree = errors.New("no dm-verity tree appended")

// VerifyAppended returns a device that checks every read of the data part
// of a disk against the tree appended to it (as 'rafsnbd export --verity'
// writes it: the data in blocks of blockSize, 4 KiB sha256 hash blocks
// from the next 4 KiB boundary, no salt). With a root hash the tree must
// match it; without one the root is taken from the stored tree, which
// still catches any change to the data that the tree was not updated for.
// ErrNoTree when the disk's size fits no data-plus-tree layout.
func VerifyAppended(disk Device, blockSize int, root []byte) (*verity.Reader, []byte, error) {
	size := uint64(disk.Size())
	bs := uint64(blockSize)
	var lastErr error
	found := false
	for d := size / bs * bs; d > 0; d -= bs {
		p := verity.NydusParams(d, blockSize)
		end := p.HashOffset + p.TreeSize()
		if end < size {
			break // smaller data only shrinks the layout further
		}
		if end != size || p.Validate() != nil {
			continue
		}
		found = true
		want := root
		if want == nil {
			var err error
			if want, err = storedRoot(disk, p); err != nil {
				return nil, nil, err
			}
		}
		r, err := verity.NewReader(readerAt{disk}, readerAt{disk}, p, want)
		if err == nil {
			// Neighbouring data sizes can share a tree layout: the right
			// one has its last data block match its digest.
			last := make([]byte, blockSize)
			if _, err = r.ReadAt(last, int64(d-bs)); err == nil {
				return r, want, nil
			}
		}
		lastErr = err
	}
	if !found {
		return nil, nil, ErrNoTree
	}
	return nil, nil, lastErr
}

// storedRoot is the root hash of the tree stored with p: the digest of its
// top hash block, or of the one data block.
func storedRoot(disk Device, p verity.Params) ([]byte, error) {
	off, n := int64(p.HashOffset), p.HashBlockSize
	if p.DataBlocks == 1 {
		off, n = 0, p.DataBlockSize
	}
	b := make([]byte, n)
	if _, err := disk.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	sum := sha256.Sum256(b)
	return sum[:], nil
}

// readerAt hides everything of a Device but ReadAt and ReadAtContext.
type readerAt struct{ d Device }

func (r readerAt) ReadAt(p []byte, off int64) (int, error) { return r.d.ReadAt(p, off) }

func (r readerAt) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if c, ok := r.d.(contextReader); ok {
		return c.ReadAtContext(ctx, p, off)
	}
	return r.d.ReadAt(p, off)
}
