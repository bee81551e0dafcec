package blobcache

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// unit is a piece of the blob that is fetched, checked and marked ready as
// a whole: a chunk, or a fixed-size range of a tarfs blob.
type unit struct {
	coff, uoff   uint64 // stored and uncompressed offsets
	csize, usize uint32
	compressed   bool
	hasDigest    bool
	digest       [32]byte
}

// layout is where a blob's units sit, and how to check them.
type layout struct {
	units    []unit   // by unit id: ci index, or range number for tarfs
	order    []uint32 // unit ids by uncompressed offset
	size     int64    // uncompressed size
	unitSize int64    // tarfs unit size, 0 for chunk units
	// Tarfs units checked by a RangeVerifier (verified.go): the unit grid
	// is shifted by phase bytes (unit i starts at i*unitSize-phase) so
	// that units line up with the verifier's groups on the device.
	phase    int64
	verifier RangeVerifier
	comp     rafs.Compressor
	digester rafs.Digester
}

// span returns the positions [lo, hi) in order of the units that overlap
// the uncompressed range [off, end).
func (l *layout) span(off, end int64) (lo, hi int) {
	if l.unitSize > 0 {
		return int((off + l.phase) / l.unitSize), int((end + l.phase + l.unitSize - 1) / l.unitSize)
	}
	lo = sort.Search(len(l.order), func(i int) bool {
		u := &l.units[l.order[i]]
		return int64(u.uoff)+int64(u.usize) > off
	})
	hi = lo + sort.Search(len(l.order)-lo, func(i int) bool {
		return int64(l.units[l.order[lo+i]].uoff) >= end
	})
	return lo, hi
}

// verify checks a unit's uncompressed bytes against its digest, or, for
// a tarfs unit of a verified backend, with the backend's RangeVerifier
// (the dm-verity tree of the image the blob belongs to).
func (l *layout) verify(ctx context.Context, u *unit, data []byte) error {
	if l.verifier != nil {
		return l.verifier.VerifyRange(ctx, int64(u.uoff), data)
	}
	if !u.hasDigest {
		return nil
	}
	if got := l.digester.Sum(data); got != u.digest {
		return fmt.Errorf("%w: %s %x, want %x", ErrDigestMismatch, l.digester, got, u.digest)
	}
	return nil
}

// maxStoredChunk bounds one chunk's stored size: chunk-info entries hold
// 24-bit sizes, and chunks are at most 16 MiB.
const maxStoredChunk = 32 << 20

// ErrDigestMismatch is wrapped by fetch errors of chunks whose bytes do not
// match their digest.
var ErrDigestMismatch = errors.New("chunk digest mismatch")

// entryFingerprint identifies a blob entry's content and layout, whatever
// its position in the blob table.
func entryFingerprint(e *rafs.BlobEntry) [32]byte {
	c := *e
	c.BlobIndex = 0
	var b [rafs.BlobEntrySize]byte
	c.Encode(b[:])
	return sha256.Sum256(append([]byte("rafsnbd blob entry 1\x00"), b[:]...))
}

// fingerprint covers everything the cached bytes were checked against:
// the blob entry, every unit's place and digest, the tarfs unit size.
func (l *layout) fingerprint(entry [32]byte) [32]byte {
	h := sha256.New()
	h.Write([]byte("rafsnbd blob layout 1\x00"))
	h.Write(entry[:])
	var b [8 + 8 + 4 + 4 + 2 + 32]byte
	binary.LittleEndian.PutUint64(b[:], uint64(l.unitSize))
	h.Write(b[:8])
	if l.verifier != nil {
		// Units checked against a verity tree are not those of the same
		// blob cached unchecked (or against another tree).
		id := l.verifier.VerifyID()
		binary.LittleEndian.PutUint64(b[:], uint64(l.phase))
		h.Write([]byte("verified\x00"))
		h.Write(b[:8])
		h.Write(id[:])
	}
	for i := range l.units {
		u := &l.units[i]
		binary.LittleEndian.PutUint64(b[0:], u.coff)
		binary.LittleEndian.PutUint64(b[8:], u.uoff)
		binary.LittleEndian.PutUint32(b[16:], u.csize)
		binary.LittleEndian.PutUint32(b[20:], u.usize)
		b[24], b[25] = boolByte(u.compressed), boolByte(u.hasDigest)
		copy(b[26:], u.digest[:])
		h.Write(b[:])
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}

// buildLayout works out blob e's units: fixed ranges for tarfs; otherwise
// the chunks of the blob's chunk-info array (read through blob), or of the
// bootstrap chunk table when the blob has none, with digests from the
// chunk table or the blob's digest section.
func buildLayout(e *rafs.BlobEntry, blob io.ReaderAt, table []rafs.ChunkInfo, opts *Options) (*layout, error) {
	l := &layout{size: int64(e.UncompressedSize), comp: e.Compressor, digester: e.Digester}
	if e.Features&(rafs.BlobFeatureZran|rafs.BlobFeatureBatch|rafs.BlobFeatureEncrypted) != 0 {
		return nil, fmt.Errorf("zran, batch and encrypted blobs (features %#x): %w", e.Features, errors.ErrUnsupported)
	}
	if e.UncompressedSize > 1<<44 {
		return nil, fmt.Errorf("uncompressed size %d beyond 2^44", e.UncompressedSize)
	}
	if e.IsTarfs() {
		if e.Compressor != rafs.CompressNone {
			return nil, fmt.Errorf("tarfs blob with compressor %v", e.Compressor)
		}
		l.unitSize = opts.TarfsUnitSize
		n := (l.size + l.unitSize - 1) / l.unitSize
		if n > 1<<32-1 {
			return nil, fmt.Errorf("tarfs blob of %d bytes needs too many units", l.size)
		}
		l.units = make([]unit, n)
		l.order = make([]uint32, n)
		for i := range l.units {
			off := uint64(i) * uint64(l.unitSize)
			size := uint32(min(uint64(l.unitSize), e.UncompressedSize-off))
			l.units[i] = unit{coff: off, uoff: off, csize: size, usize: size}
			l.order[i] = uint32(i)
		}
		return l, nil
	}
	if e.Compressor > rafs.CompressZstd {
		return nil, fmt.Errorf("unknown compressor %v", e.Compressor)
	}
	if e.Digester > rafs.DigestSHA256 {
		return nil, fmt.Errorf("unknown digester %v", e.Digester)
	}
	var chunks []rafs.BlobChunk
	if e.CICompressedSize > 0 || e.CIUncompressedSize > 0 {
		var err error
		if chunks, err = rafs.ReadBlobChunks(blob, e); err != nil {
			return nil, err
		}
	} else if chunks = chunksFromTable(e, table); chunks == nil {
		return nil, fmt.Errorf("no chunk-info array in the blob and no complete set of its %d chunks in the bootstrap chunk table", e.ChunkCount)
	}
	if len(chunks) != int(e.ChunkCount) {
		return nil, fmt.Errorf("%d chunks, blob table says %d", len(chunks), e.ChunkCount)
	}
	l.units = make([]unit, len(chunks))
	l.order = make([]uint32, len(chunks))
	for i := range chunks {
		c := &chunks[i]
		l.units[i] = unit{
			coff: c.CompressedOffset, csize: c.CompressedSize,
			uoff: c.UncompressedOffset, usize: c.UncompressedSize,
			compressed: c.Compressed(),
		}
		l.order[i] = uint32(i)
	}
	if err := l.checkChunks(e); err != nil {
		return nil, err
	}
	if err := l.digestsFromTable(e, table); err != nil {
		return nil, err
	}
	if l.missingDigests() > 0 && e.Features&rafs.BlobFeatureInlinedChunkDigest != 0 {
		digests, err := readDigestSection(blob, e)
		if err != nil {
			return nil, err
		}
		for i := range l.units {
			if u := &l.units[i]; !u.hasDigest {
				u.digest, u.hasDigest = digests[i], true
			}
		}
	}
	if n := l.missingDigests(); n > 0 && !opts.AllowUnverified {
		return nil, fmt.Errorf("%d of %d chunks have no digest in the bootstrap chunk table or the blob, so they cannot be verified", n, len(l.units))
	}
	return l, nil
}

// chunksFromTable collects blob e's chunks from the bootstrap chunk table,
// or nil unless every chunk-info index is there.
func chunksFromTable(e *rafs.BlobEntry, table []rafs.ChunkInfo) []rafs.BlobChunk {
	if e.ChunkCount == 0 || e.ChunkCount > rafs.MaxChunksPerBlob {
		return nil
	}
	chunks := make([]rafs.BlobChunk, e.ChunkCount)
	seen := make([]bool, e.ChunkCount)
	n := 0
	for i := range table {
		c := &table[i]
		if c.BlobIndex != e.BlobIndex || c.Index >= e.ChunkCount || seen[c.Index] {
			continue
		}
		seen[c.Index] = true
		n++
		chunks[c.Index] = rafs.BlobChunk{
			CompressedOffset: c.CompressedOffset, CompressedSize: c.CompressedSize,
			UncompressedOffset: c.UncompressedOffset, UncompressedSize: c.UncompressedSize,
			Flags: c.Flags & rafs.ChunkFlagCompressed,
		}
	}
	if n != int(e.ChunkCount) {
		return nil
	}
	return chunks
}

// checkChunks sorts the units by uncompressed offset and makes sure they
// can be cached side by side: non-empty, inside the blob, not overlapping,
// and decodable.
func (l *layout) checkChunks(e *rafs.BlobEntry) error {
	sort.SliceStable(l.order, func(i, j int) bool { return l.units[l.order[i]].uoff < l.units[l.order[j]].uoff })
	var prevEnd uint64
	for _, id := range l.order {
		u := &l.units[id]
		switch {
		case u.usize == 0 || u.csize == 0:
			return fmt.Errorf("chunk %d is empty", id)
		case u.uoff < prevEnd:
			return fmt.Errorf("chunk %d at uncompressed offset %d overlaps the previous chunk", id, u.uoff)
		case u.uoff > e.UncompressedSize || uint64(u.usize) > e.UncompressedSize-u.uoff:
			return fmt.Errorf("chunk %d [%d, +%d) runs past the uncompressed size %d", id, u.uoff, u.usize, e.UncompressedSize)
		case u.coff > 1<<40 || u.csize > maxStoredChunk:
			return fmt.Errorf("chunk %d stored at %d (+%d) is out of range", id, u.coff, u.csize)
		case !u.compressed && u.csize != u.usize:
			return fmt.Errorf("chunk %d is stored raw but its sizes differ (%d, %d)", id, u.csize, u.usize)
		case u.compressed && e.Compressor == rafs.CompressNone:
			return fmt.Errorf("chunk %d is compressed in a blob without compressor", id)
		}
		prevEnd = u.uoff + uint64(u.usize)
	}
	return nil
}

// digestsFromTable takes each chunk's digest from the bootstrap chunk
// table entry with the same blob and chunk-info index, which must agree
// with the blob's chunk-info entry on where the chunk is.
func (l *layout) digestsFromTable(e *rafs.BlobEntry, table []rafs.ChunkInfo) error {
	return l.eachTableUnit(e, table, func(i int, c *rafs.ChunkInfo, u *unit, placed bool) error {
		switch {
		case !placed:
			return fmt.Errorf("chunk table entry %d (chunk %d) says stored [%d, +%d) uncompressed [%d, +%d); the blob says [%d, +%d) and [%d, +%d)",
				i, c.Index, c.CompressedOffset, c.CompressedSize, c.UncompressedOffset, c.UncompressedSize,
				u.coff, u.csize, u.uoff, u.usize)
		case u.hasDigest && u.digest != c.Digest:
			return fmt.Errorf("chunk table entries disagree on the digest of chunk %d", c.Index)
		}
		u.digest, u.hasDigest = c.Digest, true
		return nil
	})
}

// checkTable checks a chunk table given by a later opener of the blob
// against the layout: every entry of e's blob names a chunk at the place
// and with the digest the layout has, so no image is served bytes checked
// against digests other than its own.
func (l *layout) checkTable(e *rafs.BlobEntry, table []rafs.ChunkInfo) error {
	return l.eachTableUnit(e, table, func(i int, c *rafs.ChunkInfo, u *unit, placed bool) error {
		switch {
		case !placed:
			return fmt.Errorf("chunk table entry %d (chunk %d) places it elsewhere than the image the blob was opened for", i, c.Index)
		case !u.hasDigest || u.digest != c.Digest:
			return fmt.Errorf("chunk table entry %d (chunk %d) has another digest than the image the blob was opened for", i, c.Index)
		}
		return nil
	})
}

// eachTableUnit calls fn for every chunk table entry of e's blob with the
// unit it names, and whether the entry places the chunk where the unit is;
// an entry naming a chunk beyond the blob's is an error.
func (l *layout) eachTableUnit(e *rafs.BlobEntry, table []rafs.ChunkInfo, fn func(i int, c *rafs.ChunkInfo, u *unit, placed bool) error) error {
	for i := range table {
		c := &table[i]
		if c.BlobIndex != e.BlobIndex {
			continue
		}
		if c.Index >= uint32(len(l.units)) {
			return fmt.Errorf("chunk table entry %d: chunk-info index %d beyond the blob's %d chunks", i, c.Index, len(l.units))
		}
		u := &l.units[c.Index]
		placed := c.UncompressedOffset == u.uoff && c.UncompressedSize == u.usize &&
			c.CompressedOffset == u.coff && c.CompressedSize == u.csize
		if err := fn(i, c, u, placed); err != nil {
			return err
		}
	}
	return nil
}

func (l *layout) missingDigests() int {
	n := 0
	for i := range l.units {
		if !l.units[i].hasDigest {
			n++
		}
	}
	return n
}

// readDigestSection reads the blob's chunk digest array (32 bytes per
// chunk in chunk-info order) through the ToC. The ToC is checked against
// the blob table's ToC digest and the section against the ToC's digest of
// it, so the digests are as trustworthy as the bootstrap.
func readDigestSection(blob io.ReaderAt, e *rafs.BlobEntry) ([][32]byte, error) {
	if e.Features&rafs.BlobFeatureHasTOC == 0 || e.TOCSize == 0 {
		return nil, fmt.Errorf("INLINED_CHUNK_DIGEST blob without a ToC")
	}
	if uint64(e.TOCSize) > e.CompressedSize || e.TOCSize > 1<<20 {
		return nil, fmt.Errorf("ToC of %d bytes does not fit the blob's %d bytes", e.TOCSize, e.CompressedSize)
	}
	toc := make([]byte, e.TOCSize)
	if _, err := blob.ReadAt(toc, int64(e.CompressedSize-uint64(e.TOCSize))); err != nil {
		return nil, fmt.Errorf("reading the ToC: %w", err)
	}
	ents, err := rafs.DecodeBlobTOC(e, toc)
	if err != nil {
		return nil, err
	}
	for _, t := range ents {
		if t.Name != rafs.BlobTOCDigestSection {
			continue
		}
		coff, csize := t.CompressedOffset, t.CompressedSize
		if t.Flags != rafs.BlobTOCFlagUncompressed || csize != t.UncompressedSize {
			return nil, fmt.Errorf("ToC entry %s: compressed sections (flags %#x) are not supported", t.Name, t.Flags)
		}
		if csize != uint64(e.ChunkCount)*32 || coff > e.CompressedSize || csize > e.CompressedSize-coff {
			return nil, fmt.Errorf("ToC entry %s: [%d, +%d) does not hold %d digests inside the blob", t.Name, coff, csize, e.ChunkCount)
		}
		sec := make([]byte, csize)
		if _, err := blob.ReadAt(sec, int64(coff)); err != nil {
			return nil, fmt.Errorf("reading the digest section: %w", err)
		}
		if sum := sha256.Sum256(sec); sum != t.Digest {
			return nil, fmt.Errorf("digest section sha256 %x, the ToC says %x", sum, t.Digest)
		}
		digests := make([][32]byte, e.ChunkCount)
		for i := range digests {
			copy(digests[i][:], sec[32*i:])
		}
		return digests, nil
	}
	return nil, fmt.Errorf("the blob's ToC has no %s entry", rafs.BlobTOCDigestSection)
}
