package blobcache

import (
	"context"
	"fmt"
	"io"

	"github.com/rafsnbd/rafsnbd/internal/zstdran"
)

// MaxZstdSpan is the largest span (uncompressed bytes between two
// checkpoints) a zstd layer may have to be read lazily. A zstd decoder
// resumes only at frame starts, so a span is at least one frame, whatever
// its size, and a SpanLayer holds DefaultSpansKept decoded spans: a layer
// with larger frames (or a table that claims them) would make every read
// decode, and keep, that much.
const MaxZstdSpan = 32 << 20

// zstdCodec is the zstd part of a SpanLayer: the zstdran table, whose
// checkpoints are frame starts.
type zstdCodec struct {
	raw Backend
	idx *zstdran.Index
}

// NewZstdLayer returns the uncompressed view of the zstd blob raw, whose
// checkpoint table is idx (checked by its UnmarshalBinary against itself,
// not against raw: the bytes are verified by the caller; the frames'
// checksums, when they have them, and the table's checkpoints as decoding
// passes them are checked too). A span larger than MaxZstdSpan is refused.
func NewZstdLayer(raw Backend, idx *zstdran.Index) (*SpanLayer, error) {
	if len(idx.Checkpoints) == 0 {
		return nil, fmt.Errorf("blobcache: zstd index without checkpoints")
	}
	if n, at := idx.LargestSpan(); n > MaxZstdSpan {
		return nil, fmt.Errorf("blobcache: zstd layer: a span of %d bytes at %d (at most %d: frames too large to be read lazily)", n, at, MaxZstdSpan)
	}
	return newSpanLayer(&zstdCodec{raw: raw, idx: idx}), nil
}

func (z *zstdCodec) kind() string          { return "zstd" }
func (z *zstdCodec) size() int64           { return z.idx.UncompressedSize }
func (z *zstdCodec) spanCount() int        { return len(z.idx.Checkpoints) }
func (z *zstdCodec) spanStart(i int) int64 { return z.idx.Checkpoints[i].Out }
func (z *zstdCodec) find(off int64) int    { return z.idx.Find(off) }
func (z *zstdCodec) backends() []Backend   { return []Backend{z.raw} }

// open reads the frames of spans [first, last] in one range read: from
// checkpoint first's frame to checkpoint last+1's (a frame start needs no
// state, so nothing else is read).
func (z *zstdCodec) open(ctx context.Context, first, last int, read rawReadFunc) (io.Reader, error) {
	cps := z.idx.Checkpoints
	cstart, cend := cps[first].In, z.idx.CompressedSize
	if last+1 < len(cps) {
		cend = cps[last+1].In
	}
	if cend <= cstart {
		return nil, fmt.Errorf("checkpoint %d: compressed range [%d, %d) is empty", first, cstart, cend)
	}
	stored, err := read(ctx, z.raw, cstart, cend-cstart, "stored bytes")
	if err != nil {
		return nil, err
	}
	return z.idx.NewReader(first, &sliceReader{b: stored})
}
