package blobcache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
)

// Geometry of the dm-verity trees DeviceVerity checks against: 512-byte
// data blocks (tarfs EROFS blocks), sha256, 4 KiB hash blocks, no salt. A
// level-0 hash block holds the digests of 128 data blocks, so one level-1
// digest covers a group of 64 KiB of the device.
const (
	VerityDataBlock = 512
	VerityHashBlock = 4096
	VerityGroupSize = VerityHashBlock / sha256.Size * VerityDataBlock
)

// VerityExtent is one blob of a composed tarfs image device: its blob id,
// its place on the device (mapped_blkaddr, its whole blocks) and its
// uncompressed bytes, unchecked (for instance a SpanLayer).
type VerityExtent struct {
	ID             string
	Offset, Length int64
	Raw            Backend
}

// DeviceVerity checks the blobs of a composed tarfs image device (the
// bootstrap from byte 0, each blob at its mapped_blkaddr, zeros between:
// blockdev.Compose's layout) against the level-1 digests of the device's
// dm-verity tree: the digest of each level-0 hash block, one per 64 KiB
// group of the device. A group is checked by hashing its 512-byte blocks
// into the level-0 hash block and comparing that block's digest.
//
// Checking happens where bytes enter the cache, per unit (see
// RangeVerifier): Store hands out the blobs' backends with a unit grid
// aligned to the device's groups (unit sizes are powers of two of at
// least 64 KiB, so an aligned unit is whole groups). A blob starts at a
// 512-byte boundary, so its first and last groups may hold the end of the
// bootstrap or of the previous blob, zeros, or the start of the next blob:
// for those groups the other extents' bytes are read too (the bootstrap
// from memory, a blob from its unchecked backend) and the whole group is
// checked; a verified shared group is kept in memory, so its other owner
// is checked against it without reading again. A group that does not
// match fails every unit that holds part of it, whichever extent changed:
// wrong bytes are never served, at the cost of a unit beside a damaged
// neighbour reading as EIO.
type DeviceVerity struct {
	level1   []byte // 32 bytes per group
	fill     []byte // a hash block's unused digest slots
	size     int64
	boot     []byte
	exts     []VerityExtent // by Offset
	unitSize int64
	id       [32]byte

	mu     sync.Mutex
	shared map[int64][]byte // group → verified bytes, for groups extents share
}

// NewDeviceVerity returns the checker of a device of size bytes whose
// bootstrap is boot and whose blobs are blobs, against level1. nydusCompat
// selects the fill of unused digest slots (nydus' sha256 of a zero block
// instead of veritysetup's zeros). unitSize is the cache unit of the
// blobs: a power of two from 64 KiB to 16 MiB.
func NewDeviceVerity(level1 []byte, nydusCompat bool, size int64, boot []byte, blobs []VerityExtent, unitSize int64) (*DeviceVerity, error) {
	groups := (size + VerityGroupSize - 1) / VerityGroupSize
	switch {
	case size <= 0 || size%VerityDataBlock != 0:
		return nil, fmt.Errorf("blobcache: verity: device of %d bytes is not whole %d-byte blocks", size, VerityDataBlock)
	case int64(len(level1)) != groups*sha256.Size:
		return nil, fmt.Errorf("blobcache: verity: %d bytes of level-1 digests for %d groups of a %d-byte device", len(level1), groups, size)
	case unitSize < VerityGroupSize || unitSize > 16<<20 || unitSize&(unitSize-1) != 0:
		return nil, fmt.Errorf("blobcache: verity: unit size %d is not a power of two in [64 KiB, 16 MiB]", unitSize)
	case int64(len(boot)) > size || len(boot)%VerityDataBlock != 0:
		return nil, fmt.Errorf("blobcache: verity: bootstrap of %d bytes does not fit the device as whole blocks", len(boot))
	}
	exts := append([]VerityExtent(nil), blobs...)
	sort.Slice(exts, func(i, j int) bool { return exts[i].Offset < exts[j].Offset })
	prevEnd := int64(len(boot))
	for _, e := range exts {
		if e.Offset < prevEnd || e.Length < 0 || e.Offset%VerityDataBlock != 0 || e.Length%VerityDataBlock != 0 || e.Length > size-e.Offset {
			return nil, fmt.Errorf("blobcache: verity: blob %s at [%d, +%d) overlaps or leaves the device", e.ID, e.Offset, e.Length)
		}
		prevEnd = e.Offset + e.Length
	}
	v := &DeviceVerity{level1: level1, fill: make([]byte, sha256.Size), size: size, boot: boot, exts: exts, unitSize: unitSize, shared: map[int64][]byte{}}
	if nydusCompat {
		f := sha256.Sum256(make([]byte, VerityHashBlock))
		v.fill = f[:]
	}
	h := sha256.New()
	h.Write([]byte("rafsnbd device verity 1\x00"))
	h.Write(v.fill)
	binary.Write(h, binary.LittleEndian, size)
	h.Write(level1)
	h.Sum(v.id[:0])
	return v, nil
}

// DeviceReader reads the composed device (blockdev.Composed).
type DeviceReader interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// CheckBootstrap checks the groups the bootstrap covers, before anything
// is served: the bootstrap is served from memory. Its last group may
// reach into the first blob; those bytes are read through dev, the
// composed device, whose blob reads are checked units (cached ones after
// a restart, so nothing is fetched again): the unit holding them was
// checked with the bootstrap's bytes in the same group, and the group is
// checked here once more as a whole.
func (v *DeviceVerity) CheckBootstrap(ctx context.Context, dev DeviceReader) error {
	n := int64(len(v.boot))
	whole := n / VerityGroupSize * VerityGroupSize
	if err := v.check(ctx, 0, v.boot[:whole]); err != nil {
		return fmt.Errorf("bootstrap: %w", err)
	}
	if whole == n {
		return nil
	}
	g := whole / VerityGroupSize
	buf := make([]byte, min(v.size, whole+VerityGroupSize)-whole)
	copy(buf, v.boot[whole:])
	if _, err := dev.ReadAtContext(ctx, buf[n-whole:], n); err != nil {
		return fmt.Errorf("bootstrap: its last group [%d, %d) reaches into the first blob, which cannot be read: %w", whole, whole+int64(len(buf)), err)
	}
	if !v.match(g, buf) {
		return fmt.Errorf("bootstrap: %w: device group %d [%d, %d) does not match the verity tree", ErrDigestMismatch, g, whole, whole+int64(len(buf)))
	}
	return nil
}

// Store returns the blobs' backends, each a RangeVerifier checking its
// units against the tree.
func (v *DeviceVerity) Store() Store { return verityStore{v} }

type verityStore struct{ v *DeviceVerity }

func (s verityStore) Open(_ context.Context, id string) (Backend, error) {
	for i := range s.v.exts {
		if s.v.exts[i].ID == id {
			return &verifiedBlob{Backend: s.v.exts[i].Raw, v: s.v, ext: &s.v.exts[i]}, nil
		}
	}
	return nil, fmt.Errorf("blobcache: verity: blob %s is not on the device: %w", id, ErrNotFound)
}

// Close closes the blobs' backends that are io.Closers.
func (v *DeviceVerity) Close() error {
	var errs []error
	for _, e := range v.exts {
		if c, ok := e.Raw.(io.Closer); ok {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

// verifiedBlob is a blob's backend as the cache sees it. It does not close
// the blob's raw backend: other blobs' checks may read it (DeviceVerity
// closes them all).
type verifiedBlob struct {
	Backend
	v   *DeviceVerity
	ext *VerityExtent
}

func (b *verifiedBlob) MayStall() bool {
	if s, ok := b.Backend.(staller); ok {
		return s.MayStall()
	}
	return true
}

func (b *verifiedBlob) UnitGrid() (int64, int64) { return b.v.unitSize, b.ext.Offset % b.v.unitSize }

func (b *verifiedBlob) VerifyID() [32]byte {
	h := sha256.New()
	h.Write(b.v.id[:])
	binary.Write(h, binary.LittleEndian, [2]int64{b.ext.Offset, b.ext.Length})
	var id [32]byte
	h.Sum(id[:0])
	return id
}

// forgetter is implemented by raw backends that keep decoded bytes
// (SpanLayer): bytes that failed a check are dropped, so a retry reads
// them again.
type forgetter interface{ Forget(off, n int64) }

func (b *verifiedBlob) VerifyRange(ctx context.Context, off int64, data []byte) error {
	if off < 0 || off+int64(len(data)) > b.ext.Length {
		// Only whole blocks of a blob are on the device (and a tar is
		// whole blocks): bytes beyond have nothing to be checked against.
		return fmt.Errorf("%w: blob %s: [%d, +%d) is not on the device", ErrDigestMismatch, b.ext.ID, off, len(data))
	}
	err := b.v.check(ctx, b.ext.Offset+off, data)
	if err != nil {
		if f, ok := b.Backend.(forgetter); ok {
			f.Forget(off, int64(len(data)))
		}
		return fmt.Errorf("blob %s [%d, +%d): %w", b.ext.ID, off, len(data), err)
	}
	return nil
}

// check verifies data, the device's bytes at off, group by group.
func (v *DeviceVerity) check(ctx context.Context, off int64, data []byte) error {
	end := off + int64(len(data))
	for g := off / VerityGroupSize; g*VerityGroupSize < end; g++ {
		gs, ge := g*VerityGroupSize, min((g+1)*VerityGroupSize, v.size)
		if gs >= off && ge <= end {
			if !v.match(g, data[gs-off:ge-off]) {
				return fmt.Errorf("%w: device group %d [%d, %d) does not match the verity tree", ErrDigestMismatch, g, gs, ge)
			}
			continue
		}
		// A group data holds only part of: the rest is another extent's,
		// or (for a read that is not a whole unit) this one's.
		buf := make([]byte, ge-gs)
		v.mu.Lock()
		known := v.shared[g]
		v.mu.Unlock()
		if known != nil {
			copy(buf, known)
		} else if err := v.readDevice(ctx, buf, gs); err != nil {
			return fmt.Errorf("device group %d [%d, %d): reading the bytes it shares with its neighbours: %w", g, gs, ge, err)
		}
		lo, hi := max(gs, off), min(ge, end)
		copy(buf[lo-gs:hi-gs], data[lo-off:hi-off])
		if !v.match(g, buf) {
			return fmt.Errorf("%w: device group %d [%d, %d) (shared with a neighbouring extent) does not match the verity tree", ErrDigestMismatch, g, gs, ge)
		}
		if known == nil {
			v.mu.Lock()
			v.shared[g] = buf
			v.mu.Unlock()
		}
	}
	return nil
}

// match hashes a group's blocks into its level-0 hash block and compares
// that block's digest with the level-1 digest.
func (v *DeviceVerity) match(g int64, data []byte) bool {
	if len(data)%VerityDataBlock != 0 || len(data) > VerityGroupSize {
		return false
	}
	var hb [VerityHashBlock]byte
	n := 0
	for k := 0; k < len(data); k += VerityDataBlock {
		d := sha256.Sum256(data[k : k+VerityDataBlock])
		n += copy(hb[n:], d[:])
	}
	for ; n+len(v.fill) <= len(hb); n += len(v.fill) {
		copy(hb[n:], v.fill)
	}
	sum := sha256.Sum256(hb[:])
	return bytes.Equal(sum[:], v.level1[g*sha256.Size:(g+1)*sha256.Size])
}

// readDevice reads the device's bytes at off unchecked: the bootstrap,
// zeros, and the blobs' raw backends.
func (v *DeviceVerity) readDevice(ctx context.Context, p []byte, off int64) error {
	clear(p)
	end := off + int64(len(p))
	if off < int64(len(v.boot)) {
		copy(p, v.boot[off:min(end, int64(len(v.boot)))])
	}
	for _, e := range v.exts {
		lo, hi := max(off, e.Offset), min(end, e.Offset+e.Length)
		if lo >= hi {
			continue
		}
		n, err := e.Raw.ReadAt(ctx, p[lo-off:hi-off], lo-e.Offset)
		if n < int(hi-lo) {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("blob %s: %w", e.ID, err)
		}
	}
	return nil
}
