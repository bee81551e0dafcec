package blobcache

import (
	"context"
	"fmt"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// RangeVerifier is implemented by a Backend whose tarfs blob has no chunk
// digests but whose bytes can be checked otherwise: a layer of an indexed
// OCI image (issue 12), checked against the dm-verity tree of the image's
// merged device (DeviceVerity). The cache then lays the blob's units out
// on the verifier's grid and calls VerifyRange on each unit's bytes before
// it marks the unit ready or serves it; a unit that fails is not cached
// and its reads fail (EIO), other units are unaffected.
type RangeVerifier interface {
	// UnitGrid is the unit size (a power of two, 4 KiB to 16 MiB) and
	// the phase: unit i covers blob bytes [i*size-phase, (i+1)*size-phase)
	// clipped to the blob, so that units start where the verifier's
	// groups do.
	UnitGrid() (size, phase int64)
	// VerifyID names what units are checked against (the tree and the
	// blob's place on the device). It is part of the ready map's
	// fingerprint, so bytes cached unchecked, or checked against another
	// tree, are never taken as checked.
	VerifyID() [32]byte
	// VerifyRange checks data, the blob's bytes at off (one whole unit).
	// A mismatch wraps ErrDigestMismatch.
	VerifyRange(ctx context.Context, off int64, data []byte) error
}

// useVerifier makes a tarfs layout use be's RangeVerifier, if it has one:
// the units are recut on its grid. Blobs with chunk digests keep theirs.
func (l *layout) useVerifier(be Backend, e *rafs.BlobEntry) error {
	v, ok := be.(RangeVerifier)
	if !ok {
		return nil
	}
	if !e.IsTarfs() {
		return fmt.Errorf("a range-verified backend for a blob that is not tarfs")
	}
	size, phase := v.UnitGrid()
	if size < 4096 || size > 16<<20 || size&(size-1) != 0 || phase < 0 || phase >= size {
		return fmt.Errorf("verifier unit grid (%d, phase %d) is not a power of two in [4 KiB, 16 MiB]", size, phase)
	}
	n := (l.size + phase + size - 1) / size
	if l.size == 0 {
		n = 0
	}
	if n > 1<<32-1 {
		return fmt.Errorf("tarfs blob of %d bytes needs too many units", l.size)
	}
	l.unitSize, l.phase, l.verifier = size, phase, v
	l.units = make([]unit, n)
	l.order = make([]uint32, n)
	for i := range l.units {
		lo := max(0, int64(i)*size-phase)
		hi := min(l.size, int64(i+1)*size-phase)
		l.units[i] = unit{coff: uint64(lo), uoff: uint64(lo), csize: uint32(hi - lo), usize: uint32(hi - lo)}
		l.order[i] = uint32(i)
	}
	return nil
}
