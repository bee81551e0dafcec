// Package blockdev composes a RAFS v6 image into one flat, read-only block
// device, as nydus' BlockDevice does: the bootstrap's blocks first, then each
// blob's uncompressed space at its mapped_blkaddr, zeros in the holes between
// them. The kernel mounts the result with `mount -t erofs` and no device=
// options, because EROFS adds mapped_blkaddr to every chunk address itself.
//
// A Device is what every consumer reads: the NBD service, the exporter and
// the verity builder. It does not know how blob bytes are obtained; a blob
// source is any io.ReaderAt over the blob's uncompressed space.
package blockdev

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/rafsnbd/rafsnbd/internal/readat"
)

// Device is a read-only block device of a fixed size.
type Device interface {
	io.ReaderAt
	Size() int64
}

// ReaderAtContext is implemented by devices and blob sources whose reads
// may wait (on a fetch from a backend): ctx bounds the wait. Package nbd
// passes each request's context through it when the device has it.
type ReaderAtContext interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// Staller is implemented by devices and blob sources that know whether a
// read may wait on a network or backend fetch. A source without it is
// taken to be a plain file or memory, which does not stall.
type Staller interface {
	MayStall() bool
}

// ErrOutOfRange is returned for reads that start at or beyond the device's
// end. Reads that straddle the end fail whole: a short read would let a
// caller serve zeros it never read.
var ErrOutOfRange = errors.New("blockdev: read beyond end of device")

// Extent maps [Offset, Offset+Length) of the device to [0, Length) of
// Source. Bytes of the device covered by no extent read as zeros.
type Extent struct {
	Name   string // for messages: "bootstrap", "blob <id>"
	Offset int64
	Length int64
	Source io.ReaderAt
}

// Composed is a device assembled from extents. It is safe for concurrent
// use when its sources are.
type Composed struct {
	extents   []Extent // sorted by Offset, non-overlapping, none empty
	size      int64
	blockSize uint32
}

// New builds a device of size bytes from extents, which must lie inside the
// device and must not overlap. blockSize is the unit clients should use
// (the EROFS block size of the image).
func New(size int64, blockSize uint32, extents []Extent) (*Composed, error) {
	if size < 0 {
		return nil, fmt.Errorf("blockdev: negative device size %d", size)
	}
	if blockSize == 0 || blockSize&(blockSize-1) != 0 {
		return nil, fmt.Errorf("blockdev: block size %d is not a power of two", blockSize)
	}
	sorted := make([]Extent, 0, len(extents))
	for _, e := range extents {
		if e.Length < 0 || e.Offset < 0 || e.Offset > size || e.Length > size-e.Offset {
			return nil, fmt.Errorf("blockdev: %s: extent [%d, +%d) outside device of %d bytes", e.Name, e.Offset, e.Length, size)
		}
		if e.Length > 0 {
			if e.Source == nil {
				return nil, fmt.Errorf("blockdev: %s: extent has no source", e.Name)
			}
			sorted = append(sorted, e)
		}
	}
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].Offset < sorted[j].Offset })
	for i := 1; i < len(sorted); i++ {
		prev, cur := sorted[i-1], sorted[i]
		if cur.Offset < prev.Offset+prev.Length {
			return nil, fmt.Errorf("blockdev: %s [%d, +%d) overlaps %s [%d, +%d)",
				cur.Name, cur.Offset, cur.Length, prev.Name, prev.Offset, prev.Length)
		}
	}
	return &Composed{extents: sorted, size: size, blockSize: blockSize}, nil
}

// Size is the device size in bytes.
func (d *Composed) Size() int64 { return d.size }

// BlockSize is the device's logical block size.
func (d *Composed) BlockSize() uint32 { return d.blockSize }

// Extents returns the device's data extents in address order; the gaps
// between them are holes.
func (d *Composed) Extents() []Extent { return d.extents }

// MayStall reports whether a read may wait on a network or backend fetch:
// whether any extent's source says so (see Staller).
func (d *Composed) MayStall() bool {
	for _, e := range d.extents {
		if s, ok := e.Source.(Staller); ok && s.MayStall() {
			return true
		}
	}
	return false
}

// ReadAt reads len(p) bytes at off. A read must lie wholly inside the
// device; otherwise it fails without returning data.
func (d *Composed) ReadAt(p []byte, off int64) (int, error) {
	return d.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt with ctx passed to the sources that take one
// (ReaderAtContext), to bound waits for fetches.
func (d *Composed) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 || off > d.size || int64(len(p)) > d.size-off {
		return 0, fmt.Errorf("%w: [%d, +%d) of %d bytes", ErrOutOfRange, off, len(p), d.size)
	}
	if len(p) == 0 {
		return 0, nil
	}
	// First extent that ends after off; a handful of extents, so a binary
	// search is all the index this needs.
	i := sort.Search(len(d.extents), func(i int) bool {
		e := d.extents[i]
		return e.Offset+e.Length > off
	})
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		if i >= len(d.extents) || d.extents[i].Offset >= pos+int64(len(p)-done) {
			clear(p[done:]) // trailing hole
			return len(p), nil
		}
		e := d.extents[i]
		if pos < e.Offset { // hole before the extent
			n := int(e.Offset - pos)
			clear(p[done : done+n])
			done += n
			continue
		}
		n := len(p) - done
		if rest := e.Offset + e.Length - pos; int64(n) > rest {
			n = int(rest)
		}
		if err := readSource(ctx, e.Source, p[done:done+n], pos-e.Offset); err != nil {
			return done, fmt.Errorf("blockdev: %s at %d: %w", e.Name, pos-e.Offset, err)
		}
		done += n
		i++
	}
	return len(p), nil
}

// readSource reads all of p at off from src, with ctx if src takes one.
// It is on every device read, so it calls the source directly (binding ctx
// into an io.ReaderAt cost an allocation per read).
func readSource(ctx context.Context, src io.ReaderAt, p []byte, off int64) error {
	var n int
	var err error
	if rc, ok := src.(ReaderAtContext); ok {
		n, err = rc.ReadAtContext(ctx, p, off)
	} else {
		n, err = src.ReadAt(p, off)
	}
	_, err = readat.Complete(n, len(p), err)
	return err
}
