package blobcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/rafsnbd/rafsnbd/internal/gzran"
)

// gzipCodec is the gzip part of a SpanLayer: the gzran checkpoint table,
// and the blob of its checkpoints' windows.
type gzipCodec struct {
	raw, windows Backend
	idx          *gzran.Index

	mu     sync.Mutex
	window map[int][]byte // checkpoint → its stored window, once fetched and checked
}

// NewGzipLayer returns the uncompressed view of the gzip blob raw, whose
// checkpoint table is idx (checked by its UnmarshalBinary against itself,
// not against raw: the bytes are verified by the caller) and whose
// checkpoints' windows are in the blob windows (idx.Windows(); nil when
// every checkpoint has its Window).
//
// A span is inflated from its checkpoint's window: one range read of the
// windows blob, made beside the read of the stored bytes, the first time
// the checkpoint is used (a reader that starts the image fetches the
// windows it resumes at, not the table's).
func NewGzipLayer(raw, windows Backend, idx *gzran.Index) (*SpanLayer, error) {
	if len(idx.Checkpoints) == 0 && idx.UncompressedSize > 0 {
		return nil, errors.New("blobcache: gzip index without checkpoints")
	}
	return newSpanLayer(&gzipCodec{raw: raw, windows: windows, idx: idx, window: map[int][]byte{}}), nil
}

func (g *gzipCodec) kind() string          { return "gzip" }
func (g *gzipCodec) size() int64           { return g.idx.UncompressedSize }
func (g *gzipCodec) spanCount() int        { return len(g.idx.Checkpoints) }
func (g *gzipCodec) spanStart(i int) int64 { return g.idx.Checkpoints[i].Out }
func (g *gzipCodec) find(off int64) int    { return g.idx.Find(off) }
func (g *gzipCodec) backends() []Backend   { return []Backend{g.raw, g.windows} }

// open reads the stored bytes of spans [first, last] in one range read,
// and checkpoint first's window beside it, and inflates from there.
func (g *gzipCodec) open(ctx context.Context, first, last int, read rawReadFunc) (io.Reader, error) {
	cps := g.idx.Checkpoints
	cstart := cps[first].In / 8
	cend := g.idx.CompressedSize
	if last+1 < len(cps) {
		// The byte holding the next checkpoint's block header ends the
		// data of span last; the inflater reads nothing it does not need.
		cend = min(cend, (cps[last+1].In+7)/8+1)
	}
	if cend <= cstart {
		return nil, fmt.Errorf("checkpoint %d: compressed range [%d, %d) is empty", first, cstart, cend)
	}
	// The window comes from another blob: both reads are made at once.
	var (
		window []byte
		fresh  bool
		werr   error
		wdone  = make(chan struct{})
	)
	go func() {
		defer close(wdone)
		window, fresh, werr = g.checkpointWindow(ctx, first, read)
	}()
	stored, err := read(ctx, g.raw, cstart, cend-cstart, "stored bytes")
	<-wdone
	if err == nil {
		err = werr
	}
	if err != nil {
		return nil, err
	}
	r, err := g.idx.NewReader(first, window, &sliceReader{b: stored}) // checks the window
	if err == nil && fresh {
		g.mu.Lock()
		g.window[first] = window
		g.mu.Unlock()
	}
	return r, err
}

// checkpointWindow returns checkpoint i's stored window: its Window, the
// one kept from an earlier fetch, or (fresh) the bytes of the windows
// blob at its place. A fresh window is checked by NewReader and kept by
// open only then: one that does not match is fetched again next time.
func (g *gzipCodec) checkpointWindow(ctx context.Context, i int, read rawReadFunc) (w []byte, fresh bool, err error) {
	c := &g.idx.Checkpoints[i]
	if c.Window != nil {
		return c.Window, false, nil
	}
	g.mu.Lock()
	w = g.window[i]
	g.mu.Unlock()
	if w != nil {
		return w, false, nil
	}
	if g.windows == nil {
		return nil, false, fmt.Errorf("checkpoint %d: no window and no windows blob", i)
	}
	w, err = read(ctx, g.windows, c.WindowAt, int64(c.WindowStored), fmt.Sprintf("checkpoint %d's window", i))
	return w, err == nil, err
}
