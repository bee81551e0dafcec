package rafs

import (
	"container/list"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"sort"
	"sync"

	"github.com/rafsnbd/rafsnbd/internal/readat"
)

// Blob-side parsing (§11): a data blob's chunk-info array and the
// uncompressed address space it describes.

// ciFeatureMask are the blob features that change how the chunk-info array
// is decoded; the blob meta header must agree with the blob table on them.
const ciFeatureMask = BlobFeatureAligned | BlobFeatureChunkInfoV2 | BlobFeatureZran | BlobFeatureBatch | BlobFeatureEncrypted

// ReadBlobChunks reads the chunk-info array of a non-tarfs data blob: the
// ci_compressed_size bytes at ci_offset, decompressed with ci_compressor,
// then checked against the 4 KiB blob meta header that follows them
// (magics, and every ci_* field equal to the blob table entry's). The
// returned chunks are in ci order (index = ci index of chunk indexes) and
// are validated: uncompressed ranges sorted, non-overlapping and inside
// uncompressed_size; compressed ranges inside compressed_size.
//
// Tarfs blobs have no chunk-info array; for them ReadBlobChunks returns
// nil, nil. ZRAN, batch and encrypted blobs are reported as
// errors.ErrUnsupported.
func ReadBlobChunks(blob io.ReaderAt, e *BlobEntry) ([]BlobChunk, error) {
	s := fmt.Sprintf("blob %s", e.ID())
	if e.IsTarfs() {
		return nil, nil
	}
	if f := e.Features & (BlobFeatureZran | BlobFeatureBatch | BlobFeatureEncrypted); f != 0 {
		return nil, fmt.Errorf("rafs: %s: features %#x (zran, batch or encrypted chunks): %w", s, f, errors.ErrUnsupported)
	}
	if e.ChunkCount > MaxChunksPerBlob {
		return nil, formatErr(-1, s, "chunk_count", e.ChunkCount, "more than 2^24 chunks")
	}
	entSize := uint64(CIv1EntrySize)
	if e.Features&BlobFeatureChunkInfoV2 != 0 {
		entSize = CIv2EntrySize
	}
	if e.CIUncompressedSize != uint64(e.ChunkCount)*entSize {
		return nil, formatErr(-1, s, "ci_uncompressed_size", e.CIUncompressedSize, "must be %d chunks × %d bytes", e.ChunkCount, entSize)
	}
	if e.CICompressor > CompressZstd {
		return nil, formatErr(-1, s, "ci_compressor", uint32(e.CICompressor), "unknown compressor")
	}
	if e.CICompressor == CompressNone && e.CICompressedSize != e.CIUncompressedSize {
		return nil, formatErr(-1, s, "ci_compressed_size", e.CICompressedSize, "uncompressed chunk info must be %d bytes", e.CIUncompressedSize)
	}
	if e.CICompressedSize > e.CIUncompressedSize && e.CIUncompressedSize > 0 {
		// lz4/zstd/gzip framing of a tiny array can exceed it, but not by
		// more than a header; nydus refuses any growth.
		return nil, formatErr(-1, s, "ci_compressed_size", e.CICompressedSize, "larger than ci_uncompressed_size %d", e.CIUncompressedSize)
	}
	hdrOff, carry := bits.Add64(e.CIOffset, e.CICompressedSize, 0)
	if carry != 0 || hdrOff > maxBlobCompressedSize {
		return nil, formatErr(-1, s, "ci_offset", e.CIOffset, "ci_offset + ci_compressed_size overflows")
	}
	// Read the header first: if it is there, so are the bytes before it,
	// which bounds the allocation below by the blob's real size.
	hb, err := readBlob(blob, hdrOff, BlobMetaHeaderSize, s, "blob meta header")
	if err != nil {
		return nil, err
	}
	var h BlobMetaHeader
	h.Decode(hb)
	ho := int64(hdrOff)
	hs := s + " meta header"
	switch {
	case h.Magic != BlobMetaMagic:
		return nil, formatErr(ho, hs, "magic", h.Magic, "want %#x", BlobMetaMagic)
	case h.Magic2 != BlobMetaMagic:
		return nil, formatErr(ho+4092, hs, "magic2", h.Magic2, "want %#x", BlobMetaMagic)
	case h.Features&ciFeatureMask != e.Features&ciFeatureMask:
		return nil, formatErr(ho+4, hs, "features", h.Features, "disagrees with the blob table's features %#x", e.Features)
	case h.CICompressor != e.CICompressor:
		return nil, formatErr(ho+8, hs, "ci_compressor", uint32(h.CICompressor), "blob table says %d", e.CICompressor)
	case h.CIEntries != e.ChunkCount:
		return nil, formatErr(ho+12, hs, "ci_entries", h.CIEntries, "blob table says %d chunks", e.ChunkCount)
	case h.CIOffset != e.CIOffset:
		return nil, formatErr(ho+16, hs, "ci_offset", h.CIOffset, "blob table says %d", e.CIOffset)
	case h.CICompressedSize != e.CICompressedSize:
		return nil, formatErr(ho+24, hs, "ci_compressed_size", h.CICompressedSize, "blob table says %d", e.CICompressedSize)
	case h.CIUncompressedSize != e.CIUncompressedSize:
		return nil, formatErr(ho+32, hs, "ci_uncompressed_size", h.CIUncompressedSize, "blob table says %d", e.CIUncompressedSize)
	}
	packed, err := readBlob(blob, e.CIOffset, e.CICompressedSize, s, "chunk info")
	if err != nil {
		return nil, err
	}
	raw := packed
	if e.CICompressor != CompressNone {
		raw = make([]byte, e.CIUncompressedSize)
		if err := Decompress(e.CICompressor, raw, packed); err != nil {
			return nil, &FormatError{Off: int64(e.CIOffset), Struct: s, Field: "chunk info", Msg: err.Error()}
		}
	}
	chunks := make([]BlobChunk, e.ChunkCount)
	var prevEnd uint64
	for i := range chunks {
		c := &chunks[i]
		if entSize == CIv2EntrySize {
			*c = DecodeCIv2(raw[uint64(i)*entSize:])
		} else {
			*c = DecodeCIv1(raw[uint64(i)*entSize:])
		}
		if err := checkBlobChunk(e, c, i, prevEnd, s); err != nil {
			return nil, err
		}
		prevEnd = c.UncompressedOffset + uint64(c.UncompressedSize)
	}
	return chunks, nil
}

func checkBlobChunk(e *BlobEntry, c *BlobChunk, i int, prevEnd uint64, s string) error {
	f := fmt.Sprintf("chunk %d", i)
	switch {
	case c.Flags&^uint32(ChunkFlagCompressed|ChunkFlagHasCRC32) != 0:
		return formatErr(-1, s, f+" flags", c.Flags, "zran, batch or encrypted chunk in a blob without those features")
	case c.UncompressedSize == 0 || c.CompressedSize == 0:
		return formatErr(-1, s, f+" size", c.CompressedSize, "empty chunk")
	case e.ChunkSize != 0 && c.UncompressedSize > e.ChunkSize:
		return formatErr(-1, s, f+" uncompressed size", c.UncompressedSize, "larger than the blob's chunk size %d", e.ChunkSize)
	case c.UncompressedOffset < prevEnd:
		return formatErr(-1, s, f+" uncompressed offset", c.UncompressedOffset, "overlaps or precedes the previous chunk (ends at %d)", prevEnd)
	case c.UncompressedOffset > e.UncompressedSize || uint64(c.UncompressedSize) > e.UncompressedSize-c.UncompressedOffset:
		return formatErr(-1, s, f+" uncompressed offset", c.UncompressedOffset,
			"%d bytes run past the uncompressed size %d", c.UncompressedSize, e.UncompressedSize)
	case c.CompressedOffset > e.CompressedSize || uint64(c.CompressedSize) > e.CompressedSize-c.CompressedOffset:
		return formatErr(-1, s, f+" compressed offset", c.CompressedOffset,
			"%d bytes run past the compressed size %d", c.CompressedSize, e.CompressedSize)
	case !c.Compressed() && c.CompressedSize != c.UncompressedSize:
		return formatErr(-1, s, f+" size", c.CompressedSize, "stored raw but sizes differ")
	case c.Compressed() && e.Compressor == CompressNone:
		return formatErr(-1, s, f+" flags", c.Flags, "compressed chunk in a blob without compressor")
	}
	return nil
}

// readBlob reads exactly n bytes at off of a blob; a short blob is a
// FormatError naming what was being read.
func readBlob(r io.ReaderAt, off, n uint64, s, what string) ([]byte, error) {
	if off > 1<<62 || n > 1<<40 {
		return nil, formatErr(off, s, what, n, "range beyond any blob")
	}
	buf := make([]byte, n)
	if n == 0 {
		return buf, nil
	}
	got, err := r.ReadAt(buf, int64(off))
	if got == len(buf) {
		return buf, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return nil, formatErr(off, s, what, n, "blob ends after %d of these bytes", got)
	}
	return nil, fmt.Errorf("rafs: %s: reading %s at %d: %w", s, what, off, err)
}

// maxCachedChunkBytes bounds the decompressed chunks an UncompressedReader
// keeps; at least the most recent chunk is always kept, so sequential
// reads decompress each chunk once.
const maxCachedChunkBytes = 32 << 20

// UncompressedReader serves a blob's uncompressed address space (§11):
// each chunk's bytes at its uncompressed offset, zeros between chunks and
// up to the blob's uncompressed size. Chunks are read from the blob and
// decompressed as reads touch them, and a few recent ones are cached.
// Tarfs blobs are served as they are. It is safe for concurrent use.
type UncompressedReader struct {
	blob   io.ReaderAt
	comp   Compressor
	size   int64
	direct bool
	chunks []BlobChunk // sorted by uncompressed offset

	mu       sync.Mutex
	lru      *list.List            // of *cachedChunk, most recent first
	cached   map[int]*list.Element // chunk position → lru element
	inflight map[int]*chunkFetch
	bytes    int
}

type cachedChunk struct {
	pos  int
	data []byte
}

type chunkFetch struct {
	done chan struct{}
	data []byte
	err  error
}

// NewUncompressedReader returns a reader of blob e's uncompressed space,
// whose raw bytes are in blob. chunks must come from ReadBlobChunks(blob,
// e) and are nil for a tarfs blob, which is passed through.
func NewUncompressedReader(blob io.ReaderAt, e *BlobEntry, chunks []BlobChunk) *UncompressedReader {
	size := int64(min(e.UncompressedSize, maxBlobUncompressedSize))
	sorted := append([]BlobChunk(nil), chunks...)
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].UncompressedOffset < sorted[j].UncompressedOffset })
	return &UncompressedReader{
		blob:     blob,
		comp:     e.Compressor,
		size:     size,
		direct:   e.IsTarfs(),
		chunks:   sorted,
		lru:      list.New(),
		cached:   map[int]*list.Element{},
		inflight: map[int]*chunkFetch{},
	}
}

// Size is the blob's uncompressed size.
func (r *UncompressedReader) Size() int64 { return r.size }

// ReadAt reads from the uncompressed space, following io.ReaderAt.
func (r *UncompressedReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("rafs: negative offset %d", off)
	}
	if off >= r.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), r.size-off))
	var err error
	if r.direct {
		var got int
		if got, err = readat.Full(r.blob, p[:n], off); err != nil {
			return got, fmt.Errorf("rafs: tarfs blob shorter than its uncompressed size %d: %w", r.size, err)
		}
	} else if err = r.fill(p[:n], uint64(off)); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// fill writes the uncompressed bytes [off, off+len(p)) into p.
func (r *UncompressedReader) fill(p []byte, off uint64) error {
	clear(p)
	end := off + uint64(len(p))
	i := sort.Search(len(r.chunks), func(i int) bool {
		c := &r.chunks[i]
		return c.UncompressedOffset+uint64(c.UncompressedSize) > off
	})
	for ; i < len(r.chunks) && r.chunks[i].UncompressedOffset < end; i++ {
		c := &r.chunks[i]
		data, err := r.chunkData(i)
		if err != nil {
			return err
		}
		lo := max(off, c.UncompressedOffset)
		hi := min(end, c.UncompressedOffset+uint64(c.UncompressedSize))
		copy(p[lo-off:hi-off], data[lo-c.UncompressedOffset:hi-c.UncompressedOffset])
	}
	return nil
}

// chunkData returns chunk i's uncompressed bytes, from the cache or by
// decompressing it; concurrent requests for one chunk share one fetch.
// The returned slice must not be modified.
func (r *UncompressedReader) chunkData(i int) ([]byte, error) {
	r.mu.Lock()
	if el, ok := r.cached[i]; ok {
		r.lru.MoveToFront(el)
		data := el.Value.(*cachedChunk).data
		r.mu.Unlock()
		return data, nil
	}
	if f, ok := r.inflight[i]; ok {
		r.mu.Unlock()
		<-f.done
		return f.data, f.err
	}
	f := &chunkFetch{done: make(chan struct{})}
	r.inflight[i] = f
	r.mu.Unlock()

	f.data, f.err = r.load(&r.chunks[i])

	r.mu.Lock()
	delete(r.inflight, i)
	if f.err == nil {
		r.cached[i] = r.lru.PushFront(&cachedChunk{pos: i, data: f.data})
		r.bytes += len(f.data)
		for r.bytes > maxCachedChunkBytes && r.lru.Len() > 1 {
			old := r.lru.Remove(r.lru.Back()).(*cachedChunk)
			delete(r.cached, old.pos)
			r.bytes -= len(old.data)
		}
	}
	r.mu.Unlock()
	close(f.done)
	return f.data, f.err
}

func (r *UncompressedReader) load(c *BlobChunk) ([]byte, error) {
	s := fmt.Sprintf("chunk at uncompressed offset %d", c.UncompressedOffset)
	src, err := readBlob(r.blob, c.CompressedOffset, uint64(c.CompressedSize), s, "compressed data")
	if err != nil {
		return nil, err
	}
	if !c.Compressed() {
		if len(src) != int(c.UncompressedSize) {
			return nil, fmt.Errorf("rafs: %s: raw chunk is %d bytes, want %d", s, len(src), c.UncompressedSize)
		}
		return src, nil
	}
	dst := make([]byte, c.UncompressedSize)
	if err := Decompress(r.comp, dst, src); err != nil {
		return nil, fmt.Errorf("rafs: %s (compressed %d bytes at %d): %w", s, c.CompressedSize, c.CompressedOffset, err)
	}
	return dst, nil
}
