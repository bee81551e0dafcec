package blobcache

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// Options tune a Cache. The zero value gives the defaults.
type Options struct {
	// MaxFetchSize bounds the stored bytes of one merged backend request
	// (default 4 MiB); a single larger chunk is still fetched alone.
	MaxFetchSize int64
	// MergeGap is the largest hole between two chunks' stored ranges that
	// is read through rather than split into two requests (default 16 KiB).
	MergeGap int64
	// FetchTimeout bounds one fetch: backend request(s) with the
	// backend's own retries, decompression and the cache write (default 2m).
	FetchTimeout time.Duration
	// FetchAttempts is how many times a read tries to fetch a unit whose
	// fetch failed, for instance with a digest mismatch (default 2).
	FetchAttempts int
	// FlushInterval is how long verified units may stay volatile before
	// the data file is synced and their ready bits written (default 1s).
	FlushInterval time.Duration
	// TarfsUnitSize is the unit of tarfs blobs, a power of two from 4 KiB
	// to 16 MiB (default 1 MiB).
	TarfsUnitSize int64
	// PrefetchWorkers is the number of background prefetch fetches per
	// blob (default 1).
	PrefetchWorkers int
	// AllowUnverified serves chunks that have no digest in the bootstrap
	// or blob. Tarfs blobs never have digests and do not need it.
	AllowUnverified bool
	// MemoryLimit bounds the decompressed, verified units a memory-only
	// cache (OpenMemory) keeps, over all its blobs (default 128 MiB: a few
	// hundred chunks, enough for sequential readers and a hot working
	// set, small beside the page cache). The units a read is waiting for
	// are always kept until it copied them, so a read larger than the
	// limit still succeeds.
	MemoryLimit int64
	// Logger receives prefetch and flush problems; nil discards them.
	Logger *zerolog.Logger
}

func (o *Options) fill() {
	if o.MaxFetchSize <= 0 {
		o.MaxFetchSize = 4 << 20
	}
	if o.MergeGap < 0 {
		o.MergeGap = 0
	} else if o.MergeGap == 0 {
		o.MergeGap = 16 << 10
	}
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = 2 * time.Minute
	}
	if o.FetchAttempts <= 0 {
		o.FetchAttempts = 2
	}
	if o.FlushInterval <= 0 {
		o.FlushInterval = time.Second
	}
	if o.TarfsUnitSize <= 0 {
		o.TarfsUnitSize = 1 << 20
	}
	if o.PrefetchWorkers <= 0 {
		o.PrefetchWorkers = 1
	}
	if o.MemoryLimit <= 0 {
		o.MemoryLimit = DefaultMemoryLimit
	}
	if o.Logger == nil {
		nop := zerolog.Nop()
		o.Logger = &nop
	}
}

// DefaultMemoryLimit is Options.MemoryLimit's default.
const DefaultMemoryLimit = 128 << 20

// Cache hands out Handles onto blobs: disk-backed (Open, a locked cache
// directory whose contents survive restarts) or memory-only (OpenMemory, a
// bounded LRU of verified units). The blobs open in a Cache are shared:
// opening an open blob id again returns another Handle onto the same blob,
// which is closed when its last Handle is.
type Cache struct {
	dir  string    // "" for a memory-only cache
	mem  *memUnits // memory-only: the units kept
	opts Options
	lock *os.File // disk-backed: the flock'ed lock file

	mu     sync.Mutex
	closed bool
	blobs  map[string]*openBlob // by id: open, being opened, or being closed

	opens atomic.Int64 // blobs really opened, for Stats
	// foreground counts the reads of any blob waiting for fetches: the
	// prefetch of every blob yields to them (the backends of an image's
	// blobs share one network link; per blob, fetching every layer of an
	// image would leave a read of one layer behind the others' fetches).
	foreground atomic.Int64
}

// openBlob is a Cache's record of one blob id. ready is closed once b or
// err is set; gone is set when the last Handle went (or the Cache closed)
// and is closed when b is closed, so that a new open waits for the old
// one's files to be released.
type openBlob struct {
	b     *blob
	err   error
	ready chan struct{}
	refs  int // Handles, and openers waiting on ready
	gone  chan struct{}
}

// File name suffixes of a cached blob and the lock file.
const (
	dataSuffix = ".data"
	mapSuffix  = ".map"
	metaSuffix = ".meta"
	lockName   = ".lock"
)

// ErrLocked is returned by Open when another process holds the cache.
var ErrLocked = errors.New("cache directory is in use by another process")

// ErrClosed is returned by reads of a closed Handle, or of a blob whose
// Cache was closed.
var ErrClosed = errors.New("blobcache: blob is closed")

// Open opens (creating it with mode 0750 if needed) and locks the cache
// directory dir. opts may be nil.
func Open(dir string, opts *Options) (*Cache, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	o.fill()
	if o.TarfsUnitSize < 4096 || o.TarfsUnitSize&(o.TarfsUnitSize-1) != 0 || o.TarfsUnitSize > 16<<20 {
		return nil, fmt.Errorf("blobcache: tarfs unit size %d is not a power of two in [4 KiB, 16 MiB]", o.TarfsUnitSize)
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("blobcache: %s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("blobcache: lock %s: %w", dir, err)
	}
	return &Cache{dir: dir, opts: o, lock: lock, blobs: map[string]*openBlob{}}, nil
}

// OpenMemory returns a memory-only cache: nothing is written to disk, and
// a blob's decompressed and verified units are kept in an LRU bounded by
// Options.MemoryLimit (shared by all its blobs). Every unit is checked
// exactly as in a disk-backed cache before it is served. Tarfs units have
// nothing to decompress or verify, so they are read from the backend at
// each read instead of being copied into memory. opts may be nil.
func OpenMemory(opts *Options) (*Cache, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	o.fill()
	return &Cache{opts: o, mem: newMemUnits(o.MemoryLimit), blobs: map[string]*openBlob{}}, nil
}

// Dir is the cache directory, "" for a memory-only cache.
func (c *Cache) Dir() string { return c.dir }

// CacheStats are a Cache's counters.
type CacheStats struct {
	Opens       int64 // blobs opened since the Cache was (each shared open counts once)
	OpenBlobs   int   // blobs open now
	Handles     int   // Handles open now, over all blobs
	MemoryBytes int64 // memory-only: bytes of units kept
}

// Stats returns the cache's counters.
func (c *Cache) Stats() CacheStats {
	c.mu.Lock()
	st := CacheStats{Opens: c.opens.Load()}
	for _, ob := range c.blobs {
		if ob.b != nil && ob.gone == nil {
			st.OpenBlobs++
			st.Handles += ob.refs
		}
	}
	c.mu.Unlock()
	if c.mem != nil {
		st.MemoryBytes = c.mem.bytes()
	}
	return st
}

// Close closes every blob still open (their Handles then fail with
// ErrClosed) and releases the directory lock.
func (c *Cache) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true // OpenBlob refuses to open anything from now on
	var open []*openBlob
	for _, ob := range c.blobs {
		if ob.b != nil && ob.gone == nil { // b nil: still opening, and then fails
			ob.gone = make(chan struct{})
			open = append(open, ob)
		}
	}
	lock := c.lock
	c.lock = nil
	c.mu.Unlock()
	var errs []error
	for _, ob := range open {
		errs = append(errs, c.closeBlob(ob))
	}
	if lock != nil {
		errs = append(errs, lock.Close()) // closing drops the flock
	}
	return errors.Join(errs...)
}

// closeBlob closes ob's blob, whose gone channel is set, and forgets it.
func (c *Cache) closeBlob(ob *openBlob) error {
	err := ob.b.close()
	c.mu.Lock()
	if c.blobs[ob.b.id] == ob {
		delete(c.blobs, ob.b.id)
	}
	c.mu.Unlock()
	close(ob.gone)
	return err
}

// release drops one reference to ob and closes its blob after the last.
func (c *Cache) release(ob *openBlob) error {
	c.mu.Lock()
	ob.refs--
	last := ob.refs == 0 && ob.b != nil && ob.gone == nil
	if last {
		ob.gone = make(chan struct{})
	}
	c.mu.Unlock()
	if !last {
		return nil
	}
	return c.closeBlob(ob)
}

func (c *Cache) path(id, suffix string) string { return filepath.Join(c.dir, id+suffix) }

// OpenBlob returns a Handle onto blob e, whose stored bytes store holds.
// If the blob is open in this Cache already (another image uses the same
// layer), the Handle shares it, and store is not asked; e and chunkTable
// must then agree with what the blob was opened with. Otherwise the
// backend is opened from store, its size checked against e, and the
// blob's layout read (from the backend the first time, from the cache
// directory after that).
//
// chunkTable is the bootstrap's chunk table (rafs.Image.ChunkTable), where
// chunk digests are looked up by e's blob index; it may be nil for tarfs
// blobs and blobs with inline digests. ctx bounds the open, not the Handle.
func (c *Cache) OpenBlob(ctx context.Context, store Store, e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) (*Handle, error) {
	id := e.ID()
	if err := CheckBlobID(id); err != nil {
		return nil, err
	}
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, fmt.Errorf("blobcache: blob %s: %w", id, errCacheClosed)
		}
		ob := c.blobs[id]
		if ob != nil && ob.gone != nil { // closing: wait until its files are released
			gone := ob.gone
			c.mu.Unlock()
			select {
			case <-gone:
				continue
			case <-ctx.Done():
				return nil, fmt.Errorf("blobcache: blob %s: %w", id, ctx.Err())
			}
		}
		if ob != nil {
			ob.refs++
			c.mu.Unlock()
			select {
			case <-ob.ready:
			case <-ctx.Done():
				c.release(ob)
				return nil, fmt.Errorf("blobcache: blob %s: %w", id, ctx.Err())
			}
			if ob.err != nil {
				return nil, ob.err
			}
			if err := ob.b.compatible(e, chunkTable); err != nil {
				c.release(ob)
				return nil, fmt.Errorf("blobcache: blob %s is open already, %w", id, err)
			}
			return &Handle{c: c, ob: ob, b: ob.b}, nil
		}
		ob = &openBlob{ready: make(chan struct{}), refs: 1}
		c.blobs[id] = ob
		c.mu.Unlock()

		b, err := c.openBlob(ctx, store, e, chunkTable)
		var late *blob
		c.mu.Lock()
		if err == nil && c.closed { // Close ran meanwhile and did not see b
			late, b, err = b, nil, errCacheClosed
		}
		if err != nil {
			err = fmt.Errorf("blobcache: %w", err) // the caller names the blob, the backend where it is
			delete(c.blobs, id)
		}
		ob.b, ob.err = b, err
		c.mu.Unlock()
		close(ob.ready)
		if late != nil {
			late.close()
		}
		if err != nil {
			return nil, err
		}
		c.opens.Add(1)
		return &Handle{c: c, ob: ob, b: b}, nil
	}
}

var errCacheClosed = errors.New("the cache is closed")

// Entry describes one cached blob as found on disk.
type Entry struct {
	ID         string
	Size       int64     // uncompressed size
	Units      int       // chunks, or tarfs units
	ReadyUnits int       // units cached (durably)
	DiskUsage  int64     // bytes allocated by the blob's files
	LastUsed   time.Time // when the blob was last opened
	Open       bool      // open in this Cache (List from outside says false)
	Err        error     // why the entry could not be read, if it could not
}

// List describes the blobs in cache directory dir. It takes no lock: it
// only reads, and a map being written concurrently is at worst reported
// with a stale count.
func List(dir string) ([]Entry, error) {
	names, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil // nothing cached yet
	}
	if err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	ids := map[string]bool{}
	for _, n := range names {
		name := n.Name()
		if atomicfile.IsTemp(name) || name == lockName {
			continue
		}
		for _, s := range []string{dataSuffix, mapSuffix, metaSuffix} {
			if id, ok := strings.CutSuffix(name, s); ok && CheckBlobID(id) == nil {
				ids[id] = true
			}
		}
	}
	var out []Entry
	for id := range ids {
		out = append(out, describe(dir, id))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func describe(dir, id string) Entry {
	e := Entry{ID: id}
	for _, s := range []string{dataSuffix, mapSuffix, metaSuffix} {
		var st unix.Stat_t
		if unix.Stat(filepath.Join(dir, id+s), &st) == nil {
			e.DiskUsage += st.Blocks * 512
			if s == mapSuffix {
				e.LastUsed = time.Unix(st.Mtim.Unix())
			}
		}
	}
	mp := filepath.Join(dir, id+mapSuffix)
	h, bits, err := readMapFile(mp)
	if err != nil {
		e.Err = err
		return e
	}
	e.Size = int64(h.size)
	e.Units = int(h.units)
	e.ReadyUnits = countBits(bits, int(h.units))
	return e
}

// Describe describes one blob of the cache directory as List does.
func (c *Cache) Describe(id string) Entry {
	if c.dir == "" {
		return Entry{ID: id, Err: errors.New("blobcache: a memory-only cache has no files")}
	}
	return describe(c.dir, id)
}

// List describes the blobs in the cache directory, marking the open ones.
// A memory-only cache lists nothing.
func (c *Cache) List() ([]Entry, error) {
	if c.dir == "" {
		return nil, nil
	}
	ents, err := List(c.dir)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range ents {
		ob := c.blobs[ents[i].ID]
		ents[i].Open = ob != nil
	}
	return ents, nil
}

// Remove deletes a blob's cache files. The blob must not be open.
func (c *Cache) Remove(id string) error {
	if err := CheckBlobID(id); err != nil {
		return err
	}
	if c.dir == "" {
		return errors.New("blobcache: a memory-only cache has no files to remove")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.blobs[id]; ok {
		return fmt.Errorf("blobcache: blob %s is open", id)
	}
	// The map goes first: without it the other files are never trusted.
	var errs []error
	for _, s := range []string{mapSuffix, dataSuffix, metaSuffix} {
		if err := os.Remove(c.path(id, s)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// GCOptions say what GC removes. With none set it only removes leftovers
// (temporary files of interrupted writes, and files of blobs with no
// readable map).
type GCOptions struct {
	All       bool          // every blob not open
	OlderThan time.Duration // blobs last used longer ago than this
	MaxSize   int64         // then least recently used blobs until the cache uses at most this
}

// GC removes cached blobs as opts say, never open ones, and returns what
// it removed.
func (c *Cache) GC(opts GCOptions) ([]Entry, error) {
	if c.dir == "" {
		return nil, nil
	}
	names, err := os.ReadDir(c.dir)
	if err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	var errs []error
	for _, n := range names {
		if atomicfile.IsTemp(n.Name()) {
			if err := os.Remove(filepath.Join(c.dir, n.Name())); err != nil {
				errs = append(errs, err)
			}
		}
	}
	ents, err := c.List()
	if err != nil {
		return nil, err
	}
	// Oldest first, so that MaxSize evicts the least recently used.
	sort.Slice(ents, func(i, j int) bool { return ents[i].LastUsed.Before(ents[j].LastUsed) })
	var total int64
	for _, e := range ents {
		total += e.DiskUsage
	}
	var removed []Entry
	now := time.Now()
	for _, e := range ents {
		if e.Open {
			continue
		}
		drop := opts.All || e.Err != nil ||
			opts.OlderThan > 0 && now.Sub(e.LastUsed) > opts.OlderThan ||
			opts.MaxSize > 0 && total > opts.MaxSize
		if !drop {
			continue
		}
		if err := c.Remove(e.ID); err != nil {
			errs = append(errs, err)
			continue
		}
		total -= e.DiskUsage
		removed = append(removed, e)
	}
	return removed, errors.Join(errs...)
}
