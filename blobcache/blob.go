package blobcache

import (
	"bytes"
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

// Handle is one user's reference to an open blob: its uncompressed
// address space, served from the cache and filled from the backend on
// demand, every unit verified before it is served. It is an io.ReaderAt
// safe for concurrent use. Handles from the same Cache onto the same blob
// id share one open blob; Close releases this Handle only.
type Handle struct {
	c      *Cache
	ob     *openBlob
	b      *blob
	closed atomic.Bool
}

// blob is one open blob, shared by the Handles onto it.
type blob struct {
	cache   *Cache
	id      string
	entryFP [32]byte // of the blob table entry it was opened with
	be      Backend
	local   bool // the backend said it never waits on a network
	lay     *layout
	opts    *Options
	log     zerolog.Logger

	// Disk-backed: the cache files and the in-memory ready bits (written
	// and verified). Memory-only: mem holds the units instead.
	data  *os.File
	rmap  *readyMap
	ready []atomic.Uint64
	mem   *memUnits

	// ctx is cancelled by close; every goroutine below is counted in wg.
	// It bounds background work (fetches, prefetch, flush), never stands
	// in for a reader's own context.
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

	foreground *atomic.Int64 // the cache's Cache.foreground

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
	// data[i] holds units[i]'s verified bytes in a memory-only cache (nil
	// if it failed), so the waiting readers have them even if the LRU
	// evicted them at once.
	data [][]byte
}

// flushBatch is how many pending units make the flusher run early.
const flushBatch = 256

// staller is implemented by backends that know whether a read may wait
// on a network: localfs files say false.
type staller interface{ MayStall() bool }

// openBlob opens blob e from store: the backend, its size check, the
// layout, and (disk-backed) the cache files.
func (c *Cache) openBlob(ctx context.Context, store Store, e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) (*blob, error) {
	be, err := store.Open(ctx, e.ID())
	if err != nil {
		return nil, err
	}
	b, err := c.newBlob(ctx, be, e, chunkTable)
	if err != nil {
		if cl, ok := be.(io.Closer); ok {
			cl.Close()
		}
		return nil, err
	}
	return b, nil
}

// checkStoredSize compares the backend's size with blob table entry e. A
// tarfs blob is the layer tar itself and must have exactly its
// uncompressed size: this is the only check of tarfs bytes (they have no
// chunk digests), and it catches appended or missing bytes, not changed
// ones. Other blobs must hold at least compressed_size bytes; their chunk
// digests catch any other change.
func checkStoredSize(ctx context.Context, be Backend, e *rafs.BlobEntry) error {
	size, err := be.Size(ctx)
	if err != nil {
		return fmt.Errorf("size of the stored blob: %w", err)
	}
	switch {
	case e.IsTarfs() && uint64(size) != e.UncompressedSize:
		return fmt.Errorf("stored tarfs blob has %d bytes, the bootstrap says %d: not the layer it was built from", size, e.UncompressedSize)
	case !e.IsTarfs() && uint64(size) < e.CompressedSize:
		return fmt.Errorf("stored blob has %d bytes, the bootstrap says %d: truncated", size, e.CompressedSize)
	}
	return nil
}

func (c *Cache) newBlob(ctx context.Context, be Backend, e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) (*blob, error) {
	id := e.ID()
	log := c.opts.Logger.With().Str("blob", id).Logger()
	entryFP := entryFingerprint(e)
	b := &blob{
		cache: c, id: id, entryFP: entryFP, be: be, opts: &c.opts, log: log, mem: c.mem, foreground: &c.foreground,
		inflight:  map[uint32]*fetch{},
		flushKick: make(chan struct{}, 1),
	}
	if s, ok := be.(staller); ok {
		b.local = !s.MayStall()
	}
	if c.mem != nil {
		// Memory-only: nothing recorded, the layout comes from the backend.
		if err := checkStoredSize(ctx, be, e); err != nil {
			return nil, err
		}
		lay, err := buildLayout(e, &metaReader{ctx: ctx, be: be}, chunkTable, &c.opts)
		if err != nil {
			return nil, err
		}
		if err := lay.useVerifier(be, e); err != nil { // tarfs blobs of a verified backend
			return nil, err
		}
		b.lay = lay
		b.start(false)
		return b, nil
	}

	// A disk cache that has its map checks the size once, when the blob is
	// first cached: a restart reads nothing from the backend.
	if _, err := os.Stat(c.path(id, mapSuffix)); err != nil {
		if err := checkStoredSize(ctx, be, e); err != nil {
			return nil, err
		}
	}
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
	if err := lay.useVerifier(be, e); err != nil { // tarfs blobs of a verified backend
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
	b.lay, b.data, b.rmap = lay, data, rmap
	b.ready = make([]atomic.Uint64, (len(lay.units)+63)/64)
	for id := range lay.units {
		if bitSet(rmap.bits, uint32(id)) {
			b.ready[id/64].Or(1 << (id % 64))
			b.readyUnits.Add(1)
			b.readyBytes.Add(int64(lay.units[id].usize))
		}
	}
	b.start(true)
	return b, nil
}

// start starts the blob's background work: the flusher of a disk cache.
func (b *blob) start(flusher bool) {
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.pq.init()
	if flusher {
		b.wg.Add(1)
		go b.flusher()
	}
}

// compatible checks that blob table entry e and chunkTable, given by a
// second opener of the blob, agree with what it was opened with: the same
// entry (whatever its index), and the same place and digest of every chunk
// the table lists.
func (b *blob) compatible(e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) error {
	if entryFingerprint(e) != b.entryFP {
		return errors.New("with a different blob table entry")
	}
	if b.lay.unitSize > 0 {
		return nil // tarfs: the chunk table holds no digests
	}
	return b.lay.checkTable(e, chunkTable)
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
func (h *Handle) ID() string { return h.b.id }

// Size is the size of the blob's uncompressed address space.
func (h *Handle) Size() int64 { return h.b.lay.size }

// Stats are a blob's counters since it was opened (Ready* include units
// cached before). In a memory-only cache Ready* stay 0: units come and go.
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

// Stats returns the counters of the blob (shared by its Handles).
func (h *Handle) Stats() Stats {
	b := h.b
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

// MayStall reports whether a read may wait on a backend that is not
// local: false when the backend is a local file, or when every unit of a
// disk-backed blob is cached already.
func (h *Handle) MayStall() bool {
	b := h.b
	if b.local {
		return false
	}
	return b.mem != nil || b.readyUnits.Load() < int64(len(b.lay.units))
}

// Close releases the Handle; the blob is closed (prefetch stopped, fetches
// in flight waited for, the cache made durable, files and backend closed)
// when its last Handle is. Closing twice is harmless.
func (h *Handle) Close() error {
	if h.closed.Swap(true) {
		return nil
	}
	return h.c.release(h.ob)
}

func (b *blob) isReady(id uint32) bool {
	if b.mem != nil {
		return b.mem.has(b, id)
	}
	return b.ready[id/64].Load()&(1<<(id%64)) != 0
}

// allReady reports whether the units at positions [lo, hi) are ready.
func (b *blob) allReady(lo, hi int) bool {
	for _, id := range b.lay.order[lo:hi] {
		if !b.isReady(id) {
			return false
		}
	}
	return true
}

// ReadAt reads the uncompressed space, fetching what is not cached yet. It
// fails whole (never a short read with wrong bytes) when a fetch fails.
func (h *Handle) ReadAt(p []byte, off int64) (int, error) {
	return h.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt with a context bounding the wait for fetches.
// Cancelling it abandons the wait, not the fetches other readers share.
func (h *Handle) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if h.closed.Load() {
		return 0, ErrClosed
	}
	return h.b.readAt(ctx, p, off)
}

func (b *blob) readAt(ctx context.Context, p []byte, off int64) (int, error) {
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
	switch {
	case b.mem == nil:
		// The warm path: a bitmap test per unit, then one pread.
		if err := b.ensure(ctx, off, off+int64(n), true); err != nil {
			return 0, err
		}
		if _, err := readat.Full(b.data, p[:n], off); err != nil {
			return 0, fmt.Errorf("blobcache: blob %s: cache file read at %d: %w", b.id, off, err)
		}
	case b.lay.unitSize > 0 && b.lay.verifier == nil: // verified tarfs units go through readMem
		if err := b.readStored(ctx, p[:n], off); err != nil {
			return 0, err
		}
	default:
		if err := b.readMem(ctx, p[:n], off); err != nil {
			return 0, err
		}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readStored reads a tarfs blob of a memory-only cache straight from its
// backend: its bytes are stored as they are served, and there is nothing
// to verify them against (see checkStoredSize).
func (b *blob) readStored(ctx context.Context, p []byte, off int64) error {
	if b.ctx.Err() != nil {
		return ErrClosed
	}
	n, err := b.be.ReadAt(ctx, p, off)
	b.backendReads.Add(1)
	b.backendBytes.Add(int64(n))
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("blobcache: blob %s: reading [%d, +%d): %w", b.id, off, len(p), err)
}

// readMem fills p with [off, off+len(p)) of a memory-only cache: the units
// kept in memory, and those fetched (and verified) now for the rest.
func (b *blob) readMem(ctx context.Context, p []byte, off int64) error {
	end := off + int64(len(p))
	lo, hi := b.lay.span(off, end)
	ids := b.lay.order[lo:hi]
	got := make([][]byte, len(ids))
	missing := b.mem.getAll(b, ids, got)
	if missing > 0 {
		b.foreground.Add(1)
		defer b.foreground.Add(-1)
		pos := make(map[uint32]int, missing)
		for i, id := range ids {
			pos[id] = i
		}
		var err error
		failures := 0
		// Each round fetches what is missing; a unit evicted between the
		// check and the copy (the LRU is shared) only costs another round.
		for round := 0; missing > 0 && failures < b.opts.FetchAttempts && round < b.opts.FetchAttempts+4; round++ {
			want := make([]uint32, 0, missing)
			for i, d := range got {
				if d == nil {
					want = append(want, ids[i])
				}
			}
			waits, serr := b.startFetches(want)
			if serr != nil {
				return serr
			}
			for _, f := range waits {
				select {
				case <-f.done:
				case <-ctx.Done():
					return fmt.Errorf("blobcache: blob %s: %w", b.id, ctx.Err())
				case <-b.ctx.Done():
					return ErrClosed
				}
				if f.err != nil {
					if err == nil {
						err = f.err
					}
					failures++
				}
				for k, id := range f.units {
					if i, ok := pos[id]; ok && got[i] == nil && f.data[k] != nil {
						got[i] = f.data[k]
					}
				}
			}
			missing = b.mem.getAll(b, ids, got)
		}
		if missing > 0 {
			if err == nil {
				err = fmt.Errorf("blobcache: blob %s: range [%d, %d) not filled", b.id, off, end)
			}
			return err
		}
	}
	clear(p) // holes between chunks read as zeros
	for i, id := range ids {
		u := &b.lay.units[id]
		ulo, uhi := max(off, int64(u.uoff)), min(end, int64(u.uoff)+int64(u.usize))
		copy(p[ulo-off:uhi-off], got[i][ulo-int64(u.uoff):uhi-int64(u.uoff)])
	}
	return nil
}

// Fetch makes sure [off, off+n) of the uncompressed space is cached (in a
// memory-only cache: fetched and verified once; the LRU may drop it).
func (h *Handle) Fetch(ctx context.Context, off, n int64) error {
	if h.closed.Load() {
		return ErrClosed
	}
	b := h.b
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
func (b *blob) ensure(ctx context.Context, off, end int64, foreground bool) error {
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
func (b *blob) startFetches(ids []uint32) ([]*fetch, error) {
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
		if b.mem != nil {
			f.data = make([][]byte, len(g))
		}
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
func (b *blob) group(ids []uint32) [][]uint32 {
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

func (b *blob) runFetch(f *fetch) {
	defer b.wg.Done()
	ctx, cancel := context.WithTimeout(b.ctx, b.opts.FetchTimeout)
	err := b.fetchUnits(ctx, f)
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
func (b *blob) fetchUnits(ctx context.Context, f *fetch) error {
	ids := f.units
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
	for k, id := range ids {
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
		if err := b.lay.verify(ctx, c, data); err != nil {
			b.digestErrors.Add(1)
			errs = append(errs, fmt.Errorf("unit %d (stored [%d, +%d)): %w", id, c.coff, c.csize, err))
			continue
		}
		if b.mem != nil {
			kept := bytes.Clone(data) // data is a pooled buffer
			f.data[k] = kept
			b.mem.put(b, id, kept)
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

func (b *blob) queuePersist(ids []uint32) {
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

func (b *blob) flusher() {
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
		if err := b.flush(); err != nil {
			b.log.Error().Err(err).Msg("flushing the cache")
		}
	}
}

// Flush makes the units fetched so far durable: it syncs the data file,
// then records their ready bits in the map and syncs it. (A memory-only
// cache has nothing to flush.)
func (h *Handle) Flush() error { return h.b.flush() }

func (b *blob) flush() error {
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

// close stops prefetching, waits for fetches in flight, makes the cache
// durable, and closes the files and the backend.
func (b *blob) close() error {
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
	var errs []error
	if b.mem != nil {
		b.mem.drop(b)
	} else {
		errs = append(errs, b.flush(), b.rmap.close(), b.data.Close())
	}
	if c, ok := b.be.(io.Closer); ok {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
