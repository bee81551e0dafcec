package blobcache

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// SpanLayer is a Backend over the uncompressed bytes of a compressed blob
// (an OCI layer read lazily, issue 12) whose decoding can resume at
// checkpoints: a gzip layer (NewGzipLayer) or a zstd layer of many frames
// (NewZstdLayer), given the blob's stored bytes (a registry blob or a
// file) and its checkpoint table.
//
// Reads are cut along the checkpoints: the uncompressed stream between two
// checkpoints is a span, and a read of the spans [i, j] is ONE range read
// of the stored bytes from checkpoint i's compressed offset up to where
// checkpoint j+1's data begins (the blob's end for the last span), decoded
// from checkpoint i. A read inside one span therefore costs at most the
// span's compressed bytes (plus, for gzip, checkpoint i's window: see
// NewGzipLayer). Whole spans are decoded and the last few are kept
// (DefaultSpansKept), so that a sequential reader whose reads are smaller
// than a span decodes each span once; readers that want the same span at
// once wait for one decoding.
//
// The bytes are not checked here (a resumed inflation cannot check the
// gzip CRC; a zstd frame's checksum, when it has one, is): the cache
// checks them with the layer's RangeVerifier before it keeps or serves
// them, and Forget drops kept spans that failed.
type SpanLayer struct {
	codec spanCodec
	keep  int

	mu       sync.Mutex
	spans    map[int]*list.Element // span index → kept decoded span
	lru      list.List             // of *decodedSpan, most recent first
	inflight map[int]*spanFetch    // span index → fetch decoding it

	rawReads, rawBytes atomic.Int64
}

// spanCodec is the format-specific part of a SpanLayer: its checkpoint
// table and how the stored bytes of a run of spans are read and decoded.
type spanCodec interface {
	kind() string          // "gzip", "zstd": for errors
	size() int64           // uncompressed size
	spanCount() int        // number of checkpoints
	spanStart(i int) int64 // uncompressed offset of checkpoint i
	find(off int64) int    // the last checkpoint at or before off
	// open reads the stored bytes of spans [first, last] (with read, which
	// counts them) and returns the uncompressed stream from checkpoint
	// first, at least to the end of span last.
	open(ctx context.Context, first, last int, read rawReadFunc) (io.Reader, error)
	backends() []Backend // the stored blob first
}

// rawReadFunc reads n bytes at off of b (what names them for errors).
type rawReadFunc func(ctx context.Context, b Backend, off, n int64, what string) ([]byte, error)

// DefaultSpansKept is how many decoded spans a SpanLayer keeps.
const DefaultSpansKept = 4

type decodedSpan struct {
	i    int
	data []byte // uncompressed [spanStart(i), spanStart(i+1))
}

type spanFetch struct {
	done chan struct{}
	err  error
}

func newSpanLayer(c spanCodec) *SpanLayer {
	return &SpanLayer{codec: c, keep: DefaultSpansKept, spans: map[int]*list.Element{}, inflight: map[int]*spanFetch{}}
}

// Size is the uncompressed size.
func (l *SpanLayer) Size(context.Context) (int64, error) { return l.codec.size(), nil }

// MayStall: the stored bytes may come from a network.
func (l *SpanLayer) MayStall() bool {
	if s, ok := l.codec.backends()[0].(staller); ok {
		return s.MayStall()
	}
	return true
}

// Close closes the backends.
func (l *SpanLayer) Close() error {
	var errs []error
	for _, b := range l.codec.backends() {
		if c, ok := b.(io.Closer); ok {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

// RawStats are the range reads of the stored blob (and, for gzip, of the
// windows blob), and their bytes.
func (l *SpanLayer) RawStats() (reads, bytes int64) { return l.rawReads.Load(), l.rawBytes.Load() }

// spanEnd is the uncompressed end of span i.
func (l *SpanLayer) spanEnd(i int) int64 {
	if i+1 < l.codec.spanCount() {
		return l.codec.spanStart(i + 1)
	}
	return l.codec.size()
}

// ReadAt reads uncompressed bytes.
func (l *SpanLayer) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	size := l.codec.size()
	if off < 0 {
		return 0, fmt.Errorf("blobcache: %s layer: negative offset %d", l.codec.kind(), off)
	}
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := p[:min(int64(len(p)), size-off)]
	end := off + int64(len(want))
	first, last := l.codec.find(off), l.codec.find(end-1)
	got := make(map[int][]byte, last-first+1)
	for attempt := 0; ; attempt++ {
		waits, claims := l.plan(first, last, got)
		var err error
		for _, c := range claims {
			if ferr := l.fetch(ctx, c, got); ferr != nil && err == nil {
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
		if err == nil && l.collect(first, last, got) {
			break
		}
		if err != nil || attempt >= 2 { // a span evicted as we waited costs another round, not more
			if err == nil {
				err = errors.New("decoded spans evicted before they were read")
			}
			// The cache names the blob and "blobcache" in front of this.
			return 0, fmt.Errorf("%s layer: [%d, +%d): %w", l.codec.kind(), off, len(want), err)
		}
	}
	for i := first; i <= last; i++ {
		s := got[i]
		so := l.codec.spanStart(i)
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
func (l *SpanLayer) plan(first, last int, got map[int][]byte) (waits []*spanFetch, claims []spanClaim) {
	var claim []int
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := first; i <= last; i++ {
		if got[i] != nil {
			continue
		}
		if el, ok := l.spans[i]; ok {
			l.lru.MoveToFront(el)
			got[i] = el.Value.(*decodedSpan).data
			continue
		}
		if f := l.inflight[i]; f != nil {
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
		f := &spanFetch{done: make(chan struct{})}
		for _, i := range claim[lo:hi] {
			l.inflight[i] = f
		}
		claims = append(claims, spanClaim{first: claim[lo], last: claim[hi-1], f: f})
		lo = hi
	}
	return waits, claims
}

// spanClaim is a run of spans a reader fetches for everyone.
type spanClaim struct {
	first, last int
	f           *spanFetch
}

// collect takes the kept spans into got and reports whether all of
// [first, last] are there.
func (l *SpanLayer) collect(first, last int, got map[int][]byte) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	all := true
	for i := first; i <= last; i++ {
		if got[i] != nil {
			continue
		}
		if el, ok := l.spans[i]; ok {
			got[i] = el.Value.(*decodedSpan).data
			continue
		}
		all = false
	}
	return all
}

// fetch reads and decodes the claimed spans, keeps them and puts them
// into got; it ends their fetch either way.
func (l *SpanLayer) fetch(ctx context.Context, c spanClaim, got map[int][]byte) error {
	decoded, err := l.decode(ctx, c.first, c.last)
	l.mu.Lock()
	for i := c.first; i <= c.last; i++ {
		delete(l.inflight, i)
		if err == nil {
			got[i] = decoded[i-c.first]
			l.put(i, decoded[i-c.first])
		}
	}
	l.mu.Unlock()
	c.f.err = err
	close(c.f.done)
	return err
}

// put keeps span i, evicting the least recently used beyond keep. l.mu is
// held.
func (l *SpanLayer) put(i int, data []byte) {
	if el, ok := l.spans[i]; ok {
		l.lru.MoveToFront(el)
		return
	}
	l.spans[i] = l.lru.PushFront(&decodedSpan{i: i, data: data})
	for l.lru.Len() > l.keep {
		el := l.lru.Back()
		l.lru.Remove(el)
		delete(l.spans, el.Value.(*decodedSpan).i)
	}
}

// Forget drops the kept spans overlapping [off, off+n): their bytes
// failed a check, so the next read fetches them again.
func (l *SpanLayer) Forget(off, n int64) {
	size := l.codec.size()
	if n <= 0 || off >= size {
		return
	}
	first, last := l.codec.find(off), l.codec.find(min(off+n, size)-1)
	l.mu.Lock()
	for i := first; i <= last; i++ {
		if el, ok := l.spans[i]; ok {
			l.lru.Remove(el)
			delete(l.spans, i)
		}
	}
	l.mu.Unlock()
}

// decode reads the stored bytes of spans [first, last] and decodes them
// whole.
func (l *SpanLayer) decode(ctx context.Context, first, last int) ([][]byte, error) {
	r, err := l.codec.open(ctx, first, last, l.readRaw)
	if err != nil {
		return nil, err
	}
	out := make([][]byte, 0, last-first+1)
	for i := first; i <= last; i++ {
		b := make([]byte, l.spanEnd(i)-l.codec.spanStart(i))
		if _, err := io.ReadFull(r, b); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("decoding span %d (from checkpoint %d): %w", i, first, err)
		}
		out = append(out, b)
	}
	return out, nil
}

// readRaw reads n bytes at off of b, counted in RawStats.
func (l *SpanLayer) readRaw(ctx context.Context, b Backend, off, n int64, what string) ([]byte, error) {
	p := make([]byte, n)
	got, err := b.ReadAt(ctx, p, off)
	l.rawReads.Add(1)
	l.rawBytes.Add(int64(got))
	if got < len(p) {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("reading %s [%d, %d): %w", what, off, off+n, err)
	}
	return p, nil
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
