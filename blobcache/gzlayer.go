package blobcache

import (
	"container/list"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/rafsnbd/rafsnbd/internal/gzran"
)

// GzipLayer is a Backend over the uncompressed bytes of a gzip-compressed
// blob (an OCI layer read lazily, issue 12), given the blob's stored bytes
// (raw, a registry blob or a file), its gzran checkpoint table and the
// blob of the table's windows.
//
// Reads are cut along the checkpoints: the uncompressed stream between two
// checkpoints is a span, and a read of the spans [i, j] is ONE range read
// of raw from checkpoint i's compressed offset up to the byte holding
// checkpoint j+1's block header (the blob's end for the last span), which
// is inflated from checkpoint i's window. A read inside one span therefore
// costs at most the span's compressed bytes, plus checkpoint i's window
// (one range read of the windows blob, made beside the other, the first
// time the checkpoint is used: a reader that starts the image fetches the
// windows it resumes at, not the table's). Whole spans are decoded and
// the last few are kept (DefaultGzipSpansKept), so that a sequential
// reader whose reads are smaller than a span inflates each span once.
//
// The bytes are not checked here (a resumed inflation cannot check the
// gzip CRC): the cache checks them with the layer's RangeVerifier before
// it keeps or serves them, and Forget drops kept spans that failed.
type GzipLayer struct {
	raw, windows Backend
	idx          *gzran.Index
	keep         int

	mu       sync.Mutex
	spans    map[int]*list.Element // span index → kept decoded span
	lru      list.List             // of *gzSpan, most recent first
	inflight map[int]*gzFetch      // span index → fetch decoding it
	window   map[int][]byte        // checkpoint → its stored window, once fetched and checked

	rawReads, rawBytes atomic.Int64
}

// DefaultGzipSpansKept is how many decoded spans a GzipLayer keeps.
const DefaultGzipSpansKept = 4

type gzSpan struct {
	i    int
	data []byte // uncompressed [Checkpoints[i].Out, next checkpoint's Out)
}

type gzFetch struct {
	done chan struct{}
	err  error
}

// NewGzipLayer returns the uncompressed view of the gzip blob raw, whose
// checkpoint table is idx (checked by its UnmarshalBinary against itself,
// not against raw: the bytes are verified by the caller) and whose
// checkpoints' windows are in the blob windows (idx.Windows(); nil when
// every checkpoint has its Window).
func NewGzipLayer(raw, windows Backend, idx *gzran.Index) (*GzipLayer, error) {
	if len(idx.Checkpoints) == 0 && idx.UncompressedSize > 0 {
		return nil, errors.New("blobcache: gzip index without checkpoints")
	}
	return &GzipLayer{raw: raw, windows: windows, idx: idx, keep: DefaultGzipSpansKept, spans: map[int]*list.Element{},
		inflight: map[int]*gzFetch{}, window: map[int][]byte{}}, nil
}

// Size is the uncompressed size.
func (g *GzipLayer) Size(context.Context) (int64, error) { return g.idx.UncompressedSize, nil }

// MayStall: the stored bytes may come from a network.
func (g *GzipLayer) MayStall() bool {
	if s, ok := g.raw.(staller); ok {
		return s.MayStall()
	}
	return true
}

// Close closes the backends.
func (g *GzipLayer) Close() error {
	var errs []error
	for _, b := range []Backend{g.raw, g.windows} {
		if c, ok := b.(io.Closer); ok {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

// RawStats are the range reads of the stored blob and of the windows
// blob, and their bytes.
func (g *GzipLayer) RawStats() (reads, bytes int64) { return g.rawReads.Load(), g.rawBytes.Load() }

// spanEnd is the uncompressed end of span i.
func (g *GzipLayer) spanEnd(i int) int64 {
	if i+1 < len(g.idx.Checkpoints) {
		return g.idx.Checkpoints[i+1].Out
	}
	return g.idx.UncompressedSize
}

// ReadAt reads uncompressed bytes.
func (g *GzipLayer) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	size := g.idx.UncompressedSize
	if off < 0 {
		return 0, fmt.Errorf("blobcache: gzip layer: negative offset %d", off)
	}
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := p[:min(int64(len(p)), size-off)]
	end := off + int64(len(want))
	first, last := g.idx.Find(off), g.idx.Find(end-1)
	got := make(map[int][]byte, last-first+1)
	for attempt := 0; ; attempt++ {
		waits, claims := g.plan(first, last, got)
		var err error
		for _, c := range claims {
			if ferr := g.fetch(ctx, c, got); ferr != nil && err == nil {
				err = ferr
			}
		}
		for _, f := range waits {
			select {
			case <-f.done:
			case <-ctx.Done():
				return 0, ctx.Err()
			}
			if f.err != nil && err == nil {
				err = f.err
			}
		}
		if err == nil && g.collect(first, last, got) {
			break
		}
		if err != nil || attempt >= 2 { // a span evicted as we waited costs another round, not more
			if err == nil {
				err = errors.New("decoded spans evicted before they were read")
			}
			return 0, fmt.Errorf("blobcache: gzip layer: [%d, +%d): %w", off, len(want), err)
		}
	}
	for i := first; i <= last; i++ {
		s := got[i]
		so := g.idx.Checkpoints[i].Out
		lo, hi := max(off, so), min(end, so+int64(len(s)))
		copy(want[lo-off:hi-off], s[lo-so:hi-so])
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(want), nil
}

// plan takes the kept spans of [first, last] into got and returns the
// fetches to wait for and the spans this reader must fetch (claimed).
func (g *GzipLayer) plan(first, last int, got map[int][]byte) (waits []*gzFetch, claims []gzClaim) {
	var claim []int
	g.mu.Lock()
	defer g.mu.Unlock()
	for i := first; i <= last; i++ {
		if got[i] != nil {
			continue
		}
		if el, ok := g.spans[i]; ok {
			g.lru.MoveToFront(el)
			got[i] = el.Value.(*gzSpan).data
			continue
		}
		if f := g.inflight[i]; f != nil {
			if len(waits) == 0 || waits[len(waits)-1] != f {
				waits = append(waits, f)
			}
			continue
		}
		claim = append(claim, i)
	}
	for lo := 0; lo < len(claim); {
		hi := lo + 1
		for hi < len(claim) && claim[hi] == claim[hi-1]+1 {
			hi++
		}
		f := &gzFetch{done: make(chan struct{})}
		for _, i := range claim[lo:hi] {
			g.inflight[i] = f
		}
		claims = append(claims, gzClaim{first: claim[lo], last: claim[hi-1], f: f})
		lo = hi
	}
	return waits, claims
}

// gzClaim is a run of spans a reader fetches for everyone.
type gzClaim struct {
	first, last int
	f           *gzFetch
}

// collect takes the kept spans into got and reports whether all of
// [first, last] are there.
func (g *GzipLayer) collect(first, last int, got map[int][]byte) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	all := true
	for i := first; i <= last; i++ {
		if got[i] != nil {
			continue
		}
		if el, ok := g.spans[i]; ok {
			got[i] = el.Value.(*gzSpan).data
			continue
		}
		all = false
	}
	return all
}

// fetch reads and decodes the claimed spans, keeps them and puts them
// into got; it ends their fetch either way.
func (g *GzipLayer) fetch(ctx context.Context, c gzClaim, got map[int][]byte) error {
	decoded, err := g.decode(ctx, c.first, c.last)
	g.mu.Lock()
	for i := c.first; i <= c.last; i++ {
		delete(g.inflight, i)
		if err == nil {
			got[i] = decoded[i-c.first]
			g.put(i, decoded[i-c.first])
		}
	}
	g.mu.Unlock()
	c.f.err = err
	close(c.f.done)
	return err
}

// put keeps span i, evicting the least recently used beyond keep. g.mu is
// held.
func (g *GzipLayer) put(i int, data []byte) {
	if el, ok := g.spans[i]; ok {
		g.lru.MoveToFront(el)
		return
	}
	g.spans[i] = g.lru.PushFront(&gzSpan{i: i, data: data})
	for g.lru.Len() > g.keep {
		el := g.lru.Back()
		g.lru.Remove(el)
		delete(g.spans, el.Value.(*gzSpan).i)
	}
}

// Forget drops the kept spans overlapping [off, off+n): their bytes
// failed a check, so the next read fetches them again.
func (g *GzipLayer) Forget(off, n int64) {
	if n <= 0 || off >= g.idx.UncompressedSize {
		return
	}
	first, last := g.idx.Find(off), g.idx.Find(min(off+n, g.idx.UncompressedSize)-1)
	g.mu.Lock()
	for i := first; i <= last; i++ {
		if el, ok := g.spans[i]; ok {
			g.lru.Remove(el)
			delete(g.spans, i)
		}
	}
	g.mu.Unlock()
}

// decode reads the stored bytes of spans [first, last] in one range read
// and inflates them from checkpoint first.
func (g *GzipLayer) decode(ctx context.Context, first, last int) ([][]byte, error) {
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
		werr   error
		wdone  = make(chan struct{})
	)
	go func() {
		defer close(wdone)
		window, werr = g.checkpointWindow(ctx, first)
	}()
	stored, err := g.readRaw(ctx, g.raw, cstart, cend-cstart, "stored bytes")
	<-wdone
	if err == nil {
		err = werr
	}
	if err != nil {
		return nil, err
	}
	r, err := g.idx.NewReader(first, window, &sliceReader{b: stored})
	if err != nil {
		return nil, err
	}
	out := make([][]byte, 0, last-first+1)
	for i := first; i <= last; i++ {
		b := make([]byte, g.spanEnd(i)-cps[i].Out)
		if _, err := io.ReadFull(r, b); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("inflating span %d (stored from %d): %w", i, cstart, err)
		}
		out = append(out, b)
	}
	return out, nil
}

// readRaw reads n bytes at off of b, counted in RawStats.
func (g *GzipLayer) readRaw(ctx context.Context, b Backend, off, n int64, what string) ([]byte, error) {
	p := make([]byte, n)
	got, err := b.ReadAt(ctx, p, off)
	g.rawReads.Add(1)
	g.rawBytes.Add(int64(got))
	if got < len(p) {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("reading %s [%d, %d): %w", what, off, off+n, err)
	}
	return p, nil
}

// checkpointWindow returns checkpoint i's stored window: its Window, or
// the bytes of the windows blob at its place, fetched once and kept when
// they match the table's digest (a window that does not is fetched again
// next time, so a transient error is not kept either).
func (g *GzipLayer) checkpointWindow(ctx context.Context, i int) ([]byte, error) {
	c := &g.idx.Checkpoints[i]
	if c.Window != nil {
		return c.Window, nil
	}
	g.mu.Lock()
	w := g.window[i]
	g.mu.Unlock()
	if w != nil {
		return w, nil
	}
	if g.windows == nil {
		return nil, fmt.Errorf("checkpoint %d: no window and no windows blob", i)
	}
	w, err := g.readRaw(ctx, g.windows, c.WindowAt, int64(c.WindowStored), fmt.Sprintf("checkpoint %d's window", i))
	if err != nil {
		return nil, err
	}
	if sha256.Sum256(w) != c.WindowSum {
		return nil, fmt.Errorf("checkpoint %d's window [%d, +%d) does not match the table's digest", i, c.WindowAt, c.WindowStored)
	}
	g.mu.Lock()
	g.window[i] = w
	g.mu.Unlock()
	return w, nil
}

// sliceReader is a bytes.Reader without the extra API.
type sliceReader struct{ b []byte }

func (s *sliceReader) Read(p []byte) (int, error) {
	if len(s.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, s.b)
	s.b = s.b[n:]
	return n, nil
}
