package blobcache

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/internal/readat"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// Blob is one blob's uncompressed address space, served from the cache and
// filled from its backend on demand. It is an io.ReaderAt safe for
// concurrent use; Size is the uncompressed size.
type Blob struct {
	cache *Cache
	id    string
	be    Backend
	lay   *layout
	opts  *Options
	log   zerolog.Logger

	data  *os.File
	rmap  *readyMap
	ready []atomic.Uint64 // in-memory ready bits: written and verified

	// ctx is cancelled by Close; every goroutine below is counted in wg.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	inflight map[uint32]*fetch // unit id → fetch that will fill it
	closed   bool

	// Units verified and written but not yet durable, for the flusher.
	pmu       sync.Mutex
	pending   []uint32
	flushMu   sync.Mutex
	flushKick chan struct{}

	pq prefetchQueue

	foreground atomic.Int64 // reads waiting for fetches; prefetch yields to them

	readyUnits, readyBytes                 atomic.Int64
	backendReads, backendBytes             atomic.Int64
	fetchErrors, digestErrors, prefetchErr atomic.Int64
}

// fetch is one backend request and the units it fills. err is set before
// done is closed; units it did fill are ready even when err is not nil.
type fetch struct {
	units []uint32 // sorted by stored offset
	done  chan struct{}
	err   error
}

// flushBatch is how many pending units make the flusher run early.
const flushBatch = 256

// Blob opens the cached blob described by blob table entry e, whose stored
// bytes are read through be. chunkTable is the bootstrap's chunk table
// (rafs.Image.ChunkTable), where chunk digests are looked up by e's blob
// index; it may be nil for tarfs blobs and blobs with inline digests. The
// Blob owns be and closes it (if it is an io.Closer) on Close.
//
// Opening reads the blob's chunk-info array (and digest section if
// needed) from the backend the first time, and from the cache after that.
func (c *Cache) Blob(ctx context.Context, be Backend, e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) (*Blob, error) {
	id := e.ID()
	if err := CheckBlobID(id); err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.lock == nil {
		c.mu.Unlock()
		return nil, fmt.Errorf("blobcache: cache %s is closed", c.dir)
	}
	if _, ok := c.blobs[id]; ok {
		c.mu.Unlock()
		return nil, fmt.Errorf("blobcache: blob %s is already open in this cache", id)
	}
	c.blobs[id] = nil // reserved while opening
	c.mu.Unlock()

	b, err := c.openBlob(ctx, be, e, chunkTable)
	c.mu.Lock()
	closed := c.lock == nil // Close ran meanwhile and did not see b
	if err != nil || closed {
		delete(c.blobs, id)
	} else {
		c.blobs[id] = b
	}
	c.mu.Unlock()
	if err == nil && closed {
		b.Close()
		err = fmt.Errorf("cache %s was closed while the blob opened", c.dir)
	}
	if err != nil {
		return nil, fmt.Errorf("blobcache: blob %s: %w", id, err)
	}
	return b, nil
}

func (c *Cache) openBlob(ctx context.Context, be Backend, e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) (*Blob, error) {
	id := e.ID()
	log := c.opts.Logger.With().Str("blob", id).Logger()
	entryFP := entryFingerprint(e)
	metaPath := c.path(id, metaSuffix)
	exts, err := loadMeta(metaPath, entryFP)
	if err != nil {
		log.Warn().Err(err).Msg("ignoring the saved blob layout")
		exts = nil
	}
	mr := &metaReader{ctx: ctx, be: be, extents: exts}
	lay, err := buildLayout(e, mr, chunkTable, &c.opts)
	if err != nil {
		return nil, err
	}
	if mr.fetched > 0 {
		if err := atomicfile.WriteFile(metaPath, mr.encode(entryFP), 0o640); err != nil {
			return nil, fmt.Errorf("saving the blob layout: %w", err)
		}
	}

	if len(lay.units) > 1<<32-1 { // before the count becomes a uint32 below
		return nil, fmt.Errorf("%d units are too many", len(lay.units))
	}
	hdr := mapHeader{units: uint32(len(lay.units)), unitSize: uint32(lay.unitSize), size: uint64(lay.size), fingerprint: lay.fingerprint(entryFP)}
	data, rmap, err := c.openFiles(id, hdr, log)
	if err != nil {
		return nil, err
	}
	b := &Blob{
		cache: c, id: id, be: be, lay: lay, opts: &c.opts, log: log,
		data: data, rmap: rmap,
		ready:     make([]atomic.Uint64, (len(lay.units)+63)/64),
		inflight:  map[uint32]*fetch{},
		flushKick: make(chan struct{}, 1),
	}
	for id := range lay.units {
		if bitSet(rmap.bits, uint32(id)) {
			b.ready[id/64].Or(1 << (id % 64))
			b.readyUnits.Add(1)
			b.readyBytes.Add(int64(lay.units[id].usize))
		}
	}
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.pq.init()
	b.wg.Add(1)
	go b.flusher()
	return b, nil
}

// openFiles opens the data file and the ready map, starting both afresh
// unless the map matches hdr and the data file has the right size.
func (c *Cache) openFiles(id string, hdr mapHeader, log zerolog.Logger) (*os.File, *readyMap, error) {
	dataPath, mapPath := c.path(id, dataSuffix), c.path(id, mapSuffix)
	data, err := os.OpenFile(dataPath, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, nil, err
	}
	rmap, err := openMap(mapPath, hdr)
	if err == nil {
		fi, serr := data.Stat()
		if serr == nil && fi.Size() == int64(hdr.size) {
			now := time.Now()
			os.Chtimes(mapPath, now, now) // last use, for gc; best effort
			return data, rmap, nil
		}
		rmap.close()
		err = fmt.Errorf("data file size does not match")
	}
	if !errors.Is(err, os.ErrNotExist) {
		log.Info().Err(err).Msg("starting the blob's cache afresh")
	}
	// The old map goes (durably) before the data it vouched for changes,
	// so no crash can leave set bits over reset data.
	if err := os.Remove(mapPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		data.Close()
		return nil, nil, err
	}
	fail := func(err error) (*os.File, *readyMap, error) {
		data.Close()
		return nil, nil, err
	}
	if err := atomicfile.SyncDir(c.dir); err != nil {
		return fail(err)
	}
	if err := data.Truncate(0); err != nil {
		return fail(err)
	}
	if err := data.Truncate(int64(hdr.size)); err != nil {
		return fail(err)
	}
	if err := data.Sync(); err != nil {
		return fail(err)
	}
	if rmap, err = createMap(mapPath, hdr); err != nil {
		return fail(err)
	}
	return data, rmap, nil
}

// ID is the blob id.
func (b *Blob) ID() string { return b.id }

// Size is the size of the blob's uncompressed address space.
func (b *Blob) Size() int64 { return b.lay.size }

// Stats are a blob's counters since it was opened (Ready* include units
// cached before).
type Stats struct {
	Units          int
	ReadyUnits     int64
	ReadyBytes     int64 // uncompressed bytes of the ready units
	BackendReads   int64 // backend requests (each may cover several units)
	BackendBytes   int64 // stored bytes received from the backend
	FetchErrors    int64 // fetches that failed in part or whole
	DigestErrors   int64 // units whose bytes did not match their digest
	PrefetchErrors int64 // prefetch pieces that failed
}

// Stats returns the blob's counters.
func (b *Blob) Stats() Stats {
	return Stats{
		Units:          len(b.lay.units),
		ReadyUnits:     b.readyUnits.Load(),
		ReadyBytes:     b.readyBytes.Load(),
		BackendReads:   b.backendReads.Load(),
		BackendBytes:   b.backendBytes.Load(),
		FetchErrors:    b.fetchErrors.Load(),
		DigestErrors:   b.digestErrors.Load(),
		PrefetchErrors: b.prefetchErr.Load(),
	}
}

func (b *Blob) isReady(id uint32) bool { return b.ready[id/64].Load()&(1<<(id%64)) != 0 }

// allReady reports whether the units at positions [lo, hi) are ready.
func (b *Blob) allReady(lo, hi int) bool {
	for _, id := range b.lay.order[lo:hi] {
		if !b.isReady(id) {
			return false
		}
	}
	return true
}

// ReadAt reads the uncompressed space, fetching what is not cached yet. It
// fails whole (never a short read with wrong bytes) when a fetch fails.
func (b *Blob) ReadAt(p []byte, off int64) (int, error) {
	return b.ReadAtContext(b.ctx, p, off)
}

// ReadAtContext is ReadAt with a context bounding the wait for fetches.
// Cancelling it abandons the wait, not the fetches other readers share.
func (b *Blob) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("blobcache: blob %s: negative offset %d", b.id, off)
	}
	size := b.lay.size
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), size-off))
	if err := b.ensure(ctx, off, off+int64(n), true); err != nil {
		return 0, err
	}
	if _, err := readat.Full(b.data, p[:n], off); err != nil {
		return 0, fmt.Errorf("blobcache: blob %s: cache file read at %d: %w", b.id, off, err)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Fetch makes sure [off, off+n) of the uncompressed space is cached.
func (b *Blob) Fetch(ctx context.Context, off, n int64) error {
	if off < 0 || n < 0 || off > b.lay.size || n > b.lay.size-off {
		return fmt.Errorf("blobcache: blob %s: fetch [%d, +%d) outside %d bytes", b.id, off, n, b.lay.size)
	}
	for n > 0 {
		step := min(n, b.opts.MaxFetchSize)
		if err := b.ensure(ctx, off, off+step, true); err != nil {
			return err
		}
		off, n = off+step, n-step
	}
	return nil
}

// ensure makes every unit overlapping [off, end) ready, fetching the
// missing ones (or joining fetches in flight) and trying failed ones again
// up to FetchAttempts times.
func (b *Blob) ensure(ctx context.Context, off, end int64, foreground bool) error {
	lo, hi := b.lay.span(off, end)
	if b.allReady(lo, hi) {
		return nil
	}
	if foreground {
		b.foreground.Add(1)
		defer b.foreground.Add(-1)
	}
	var err error
	for attempt := 0; attempt < b.opts.FetchAttempts; attempt++ {
		var waits []*fetch
		if waits, err = b.startFetches(b.lay.order[lo:hi]); err != nil {
			return err
		}
		err = nil
		for _, f := range waits {
			select {
			case <-f.done:
			case <-ctx.Done():
				return fmt.Errorf("blobcache: blob %s: %w", b.id, ctx.Err())
			case <-b.ctx.Done():
				return ErrClosed
			}
			if f.err != nil && err == nil {
				err = f.err
			}
		}
		if b.allReady(lo, hi) {
			return nil
		}
		if err == nil { // the fetches succeeded, but a failed Flush forgot their units since
			err = fmt.Errorf("blobcache: blob %s: range [%d, %d) not filled", b.id, off, end)
		}
	}
	return err
}

// startFetches starts fetches for the units of ids that are neither ready
// nor being fetched, and returns every fetch the caller must wait for.
func (b *Blob) startFetches(ids []uint32) ([]*fetch, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, ErrClosed
	}
	var waits []*fetch
	var missing []uint32
	for _, id := range ids {
		if b.isReady(id) {
			continue
		}
		if f := b.inflight[id]; f != nil {
			if len(waits) == 0 || waits[len(waits)-1] != f {
				waits = append(waits, f) // a fetch covers neighbours, so repeats are adjacent
			}
			continue
		}
		missing = append(missing, id)
	}
	for _, g := range b.group(missing) {
		f := &fetch{units: g, done: make(chan struct{})}
		for _, id := range g {
			b.inflight[id] = f
		}
		waits = append(waits, f)
		b.wg.Add(1)
		go b.runFetch(f)
	}
	return waits, nil
}

// group splits units into backend requests: by stored offset, neighbours
// at most MergeGap apart, each request at most MaxFetchSize bytes.
func (b *Blob) group(ids []uint32) [][]uint32 {
	if len(ids) == 0 {
		return nil
	}
	u := b.lay.units
	// Usually already in order; slices.SortFunc does not allocate.
	slices.SortFunc(ids, func(a, b uint32) int { return cmp.Compare(u[a].coff, u[b].coff) })
	var groups [][]uint32
	start := 0
	first, end := u[ids[0]].coff, u[ids[0]].coff+uint64(u[ids[0]].csize)
	for i := 1; i < len(ids); i++ {
		c := &u[ids[i]]
		cend := c.coff + uint64(c.csize)
		if c.coff > end+uint64(b.opts.MergeGap) || max(end, cend)-first > uint64(b.opts.MaxFetchSize) {
			groups = append(groups, ids[start:i])
			start, first, end = i, c.coff, cend
			continue
		}
		end = max(end, cend)
	}
	return append(groups, ids[start:])
}

func (b *Blob) runFetch(f *fetch) {
	defer b.wg.Done()
	ctx, cancel := context.WithTimeout(b.ctx, b.opts.FetchTimeout)
	err := b.fetchUnits(ctx, f.units)
	cancel()
	if err != nil {
		b.fetchErrors.Add(1)
		err = fmt.Errorf("blobcache: blob %s: %w", b.id, err)
	}
	b.mu.Lock()
	for _, id := range f.units {
		if b.inflight[id] == f {
			delete(b.inflight, id)
		}
	}
	f.err = err
	b.mu.Unlock()
	close(f.done)
}

var bufPool = sync.Pool{New: func() any { return new([]byte) }}

func getBuf(n int) *[]byte {
	p := bufPool.Get().(*[]byte)
	if cap(*p) < n {
		*p = make([]byte, n)
	}
	*p = (*p)[:n]
	return p
}

// fetchUnits reads the stored bytes of units (sorted by stored offset) in
// one request, then decompresses, verifies, writes and marks each. A unit
// that fails does not stop the others.
func (b *Blob) fetchUnits(ctx context.Context, ids []uint32) error {
	u := b.lay.units
	start, end := u[ids[0]].coff, uint64(0)
	for _, id := range ids {
		end = max(end, u[id].coff+uint64(u[id].csize))
	}
	stored := getBuf(int(end - start))
	defer bufPool.Put(stored)
	n, err := b.be.ReadAt(ctx, *stored, int64(start))
	b.backendReads.Add(1)
	b.backendBytes.Add(int64(n))
	if n < len(*stored) {
		if err == nil || errors.Is(err, io.EOF) {
			err = fmt.Errorf("blob ends after %d of them: %w", n, io.ErrUnexpectedEOF)
		}
		return fmt.Errorf("reading stored bytes [%d, %d): %w", start, end, err)
	}
	var plain *[]byte
	var errs []error
	done := make([]uint32, 0, len(ids))
	for _, id := range ids {
		c := &u[id]
		data := (*stored)[c.coff-start : c.coff-start+uint64(c.csize)]
		if c.compressed {
			if plain == nil {
				plain = getBuf(int(c.usize))
				defer bufPool.Put(plain)
			}
			if cap(*plain) < int(c.usize) {
				*plain = make([]byte, c.usize)
			}
			out := (*plain)[:c.usize]
			if err := rafs.Decompress(b.lay.comp, out, data); err != nil {
				errs = append(errs, fmt.Errorf("unit %d (stored [%d, +%d)): %w", id, c.coff, c.csize, err))
				continue
			}
			data = out
		}
		if err := b.lay.verify(c, data); err != nil {
			b.digestErrors.Add(1)
			errs = append(errs, fmt.Errorf("unit %d (stored [%d, +%d)): %w", id, c.coff, c.csize, err))
			continue
		}
		if _, err := b.data.WriteAt(data, int64(c.uoff)); err != nil {
			errs = append(errs, fmt.Errorf("unit %d: writing the cache file: %w", id, err))
			continue
		}
		if old := b.ready[id/64].Or(1 << (id % 64)); old&(1<<(id%64)) == 0 {
			b.readyUnits.Add(1)
			b.readyBytes.Add(int64(c.usize))
		}
		done = append(done, id)
	}
	b.queuePersist(done)
	return errors.Join(errs...)
}

func (b *Blob) queuePersist(ids []uint32) {
	if len(ids) == 0 {
		return
	}
	b.pmu.Lock()
	b.pending = append(b.pending, ids...)
	full := len(b.pending) >= flushBatch
	b.pmu.Unlock()
	if full {
		select {
		case b.flushKick <- struct{}{}:
		default:
		}
	}
}

func (b *Blob) flusher() {
	defer b.wg.Done()
	t := time.NewTicker(b.opts.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-t.C:
		case <-b.flushKick:
		}
		if err := b.Flush(); err != nil {
			b.log.Error().Err(err).Msg("flushing the cache")
		}
	}
}

// Flush makes the units fetched so far durable: it syncs the data file,
// then records their ready bits in the map and syncs it.
func (b *Blob) Flush() error {
	b.flushMu.Lock()
	defer b.flushMu.Unlock()
	b.pmu.Lock()
	ids := b.pending
	b.pending = nil
	b.pmu.Unlock()
	if len(ids) == 0 {
		return nil
	}
	if err := b.data.Sync(); err != nil {
		// After a failed fsync the written pages may be lost; forget the
		// units so they are fetched again instead of trusted.
		for _, id := range ids {
			if old := b.ready[id/64].And(^(uint64(1) << (id % 64))); old&(1<<(id%64)) != 0 {
				b.readyUnits.Add(-1)
				b.readyBytes.Add(-int64(b.lay.units[id].usize))
			}
		}
		return fmt.Errorf("blobcache: blob %s: sync data file: %w", b.id, err)
	}
	if err := b.rmap.persist(ids); err != nil {
		return fmt.Errorf("blobcache: blob %s: write ready map: %w", b.id, err)
	}
	if err := b.rmap.sync(); err != nil {
		return fmt.Errorf("blobcache: blob %s: sync ready map: %w", b.id, err)
	}
	return nil
}

// Close stops prefetching, waits for fetches in flight, makes the cache
// durable, closes the files and the backend, and releases the blob id.
func (b *Blob) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()
	b.cancel()
	b.pq.close()
	b.wg.Wait()
	errs := []error{b.Flush(), b.rmap.close(), b.data.Close()}
	if c, ok := b.be.(io.Closer); ok {
		errs = append(errs, c.Close())
	}
	b.cache.mu.Lock()
	if b.cache.blobs[b.id] == b {
		delete(b.cache.blobs, b.id)
	}
	b.cache.mu.Unlock()
	return errors.Join(errs...)
}
