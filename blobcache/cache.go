package blobcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
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
	if o.Logger == nil {
		nop := zerolog.Nop()
		o.Logger = &nop
	}
}

// Cache is a locked cache directory holding the cached blobs.
type Cache struct {
	dir  string
	opts Options
	lock *os.File

	mu    sync.Mutex
	blobs map[string]*Blob // open blobs by id
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

// ErrClosed is returned by reads of a closed Blob.
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
	return &Cache{dir: dir, opts: o, lock: lock, blobs: map[string]*Blob{}}, nil
}

// Dir is the cache directory.
func (c *Cache) Dir() string { return c.dir }

// Close closes the blobs still open and releases the directory lock.
func (c *Cache) Close() error {
	c.mu.Lock()
	open := make([]*Blob, 0, len(c.blobs))
	for _, b := range c.blobs {
		if b != nil { // nil: still being opened by Blob, which then fails
			open = append(open, b)
		}
	}
	lock := c.lock
	c.lock = nil // Blob refuses to open anything from now on
	c.mu.Unlock()
	var errs []error
	for _, b := range open {
		errs = append(errs, b.Close())
	}
	if lock != nil {
		errs = append(errs, lock.Close()) // closing drops the flock
	}
	return errors.Join(errs...)
}

func (c *Cache) path(id, suffix string) string { return filepath.Join(c.dir, id+suffix) }

// OpenBlob opens blob e's backend from store and then the cached blob, as
// Blob does; the backend is closed again if that fails.
func (c *Cache) OpenBlob(ctx context.Context, store Store, e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) (*Blob, error) {
	be, err := store.Open(ctx, e.ID())
	if err != nil {
		return nil, err
	}
	b, err := c.Blob(ctx, be, e, chunkTable)
	if err != nil {
		if cl, ok := be.(io.Closer); ok {
			cl.Close()
		}
		return nil, err
	}
	return b, nil
}

// Entry describes one cached blob as found on disk.
type Entry struct {
	ID         string
	Size       int64     // uncompressed size
	Units      int       // chunks, or tarfs units
	ReadyUnits int       // units cached (durably)
	DiskUsage  int64     // bytes allocated by the blob's files
	LastUsed   time.Time // when a Blob was last opened for it
	Open       bool      // open in this Cache (List from outside says false)
	Err        error     // why the entry could not be read, if it could not
}

// List describes the blobs in cache directory dir. It takes no lock: it
// only reads, and a map being written concurrently is at worst reported
// with a stale count.
func List(dir string) ([]Entry, error) {
	names, err := os.ReadDir(dir)
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

// List describes the blobs in the cache directory, marking the open ones.
func (c *Cache) List() ([]Entry, error) {
	ents, err := List(c.dir)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range ents {
		_, ents[i].Open = c.blobs[ents[i].ID]
	}
	return ents, nil
}

// Remove deletes a blob's cache files. The blob must not be open.
func (c *Cache) Remove(id string) error {
	if err := CheckBlobID(id); err != nil {
		return err
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
