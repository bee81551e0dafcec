package blobcache

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"sync"
	"time"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// Range is a byte range of a blob's uncompressed space.
type Range struct {
	Off, Len int64
}

// prefetchQueue holds the pieces waiting for the background workers.
type prefetchQueue struct {
	mu      sync.Mutex
	cond    *sync.Cond
	pieces  []Range
	busy    int           // pieces being fetched
	workers int           // workers started
	idle    chan struct{} // closed when nothing is queued or busy
	closed  bool
}

func (q *prefetchQueue) init() {
	q.cond = sync.NewCond(&q.mu)
	q.idle = make(chan struct{})
	close(q.idle)
}

func (q *prefetchQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// yieldPoll is how often a prefetch worker looks again whether foreground
// reads are still waiting for fetches.
const yieldPoll = 5 * time.Millisecond

// Prefetch queues ranges of the uncompressed space to be fetched in the
// background at low priority: at most Options.PrefetchWorkers fetches at
// a time, and none starts while reads of any blob of the cache wait for
// fetches (a fetch already made is not cut short). It returns at
// once; WaitPrefetch waits for the queue to drain. Failures are logged and
// counted in Stats.PrefetchErrors; a later read simply tries again.
// The queue belongs to the blob, shared by its Handles. A memory-only
// cache does not prefetch: its bound would evict what prefetch filled.
func (h *Handle) Prefetch(ranges ...Range) {
	b := h.b
	if b.mem != nil || h.closed.Load() {
		return
	}
	q := &b.pq
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	added := false
	for _, r := range ranges {
		off, end := max(r.Off, 0), min(r.Off+r.Len, b.lay.size)
		for ; off < end; off += b.opts.MaxFetchSize {
			q.pieces = append(q.pieces, Range{off, min(b.opts.MaxFetchSize, end-off)})
			added = true
		}
	}
	if !added {
		return
	}
	select {
	case <-q.idle:
		q.idle = make(chan struct{})
	default:
	}
	for q.workers < b.opts.PrefetchWorkers {
		q.workers++
		b.wg.Add(1)
		go b.prefetchWorker()
	}
	q.cond.Broadcast()
}

// PrefetchAll queues the whole blob (rafsnbd's --prefetch-all).
func (h *Handle) PrefetchAll() { h.Prefetch(Range{0, h.b.lay.size}) }

// WaitPrefetch waits until every queued prefetch piece was tried.
func (h *Handle) WaitPrefetch(ctx context.Context) error {
	b := h.b
	b.pq.mu.Lock()
	idle := b.pq.idle
	b.pq.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-b.ctx.Done():
		return ErrClosed
	}
}

func (b *blob) prefetchWorker() {
	defer b.wg.Done()
	q := &b.pq
	for {
		q.mu.Lock()
		for len(q.pieces) == 0 && !q.closed {
			q.cond.Wait()
		}
		if q.closed {
			q.mu.Unlock()
			return
		}
		r := q.pieces[0]
		q.pieces = q.pieces[1:]
		q.busy++
		q.mu.Unlock()

		b.prefetchPiece(r)

		q.mu.Lock()
		q.busy--
		if len(q.pieces) == 0 && q.busy == 0 {
			select {
			case <-q.idle:
			default:
				close(q.idle)
			}
		}
		q.mu.Unlock()
	}
}

func (b *blob) prefetchPiece(r Range) {
	// Low priority: let waiting foreground reads have the backend first.
	for b.foreground.Load() > 0 {
		select {
		case <-b.ctx.Done():
			return
		case <-time.After(yieldPoll):
		}
	}
	if err := b.ensure(b.ctx, r.Off, r.Off+r.Len, false); err != nil {
		if errors.Is(err, ErrClosed) || b.ctx.Err() != nil {
			return
		}
		b.prefetchErr.Add(1)
		b.log.Warn().Err(err).Int64("off", r.Off).Int64("len", r.Len).Msg("prefetch failed")
	}
}

// PrefetchRanges maps files of img to the blob ranges holding their data,
// by blob index: the files of the bootstrap's prefetch table, and those
// named by paths (a directory stands for every regular file below it).
// Adjacent and overlapping ranges are merged. Missing paths are errors.
func PrefetchRanges(img *rafs.Image, paths []string) (map[int][]Range, error) {
	out := map[int][]Range{}
	visited := map[uint64]bool{}
	var add func(e *rafs.Entry, depth int) error
	add = func(e *rafs.Entry, depth int) error {
		if visited[e.Nid] {
			return nil
		}
		visited[e.Nid] = true
		switch {
		case e.IsRegular():
			exts, err := img.FileExtents(e)
			if err != nil {
				return err
			}
			for _, x := range exts {
				if x.Blob >= 0 {
					out[x.Blob] = append(out[x.Blob], Range{int64(x.BlobOffset), int64(x.Length)})
				}
			}
		case e.IsDir():
			if depth > 4096 {
				return fmt.Errorf("rafs: inode %d: directories nested too deep", e.Nid)
			}
			ents, err := img.ReadDir(e.Nid)
			if err != nil {
				return err
			}
			for _, d := range ents {
				child, err := img.Inode(d.Nid)
				if err != nil {
					return err
				}
				if err := add(child, depth+1); err != nil {
					return err
				}
			}
		}
		return nil
	}
	// RAFS v6 prefetch tables hold inode addresses (nids).
	for _, nid := range img.PrefetchTable {
		e, err := img.Inode(uint64(nid))
		if err != nil {
			return nil, fmt.Errorf("prefetch table entry %d: %w", nid, err)
		}
		if err := add(e, 0); err != nil {
			return nil, err
		}
	}
	for _, p := range paths {
		e, err := img.Lookup(p)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("prefetch %q: %w", p, err)
			}
			return nil, err
		}
		if err := add(e, 0); err != nil {
			return nil, err
		}
	}
	for bi, rs := range out {
		out[bi] = mergeRanges(rs)
	}
	return out, nil
}

func mergeRanges(rs []Range) []Range {
	sort.Slice(rs, func(i, j int) bool { return rs[i].Off < rs[j].Off })
	var out []Range
	for _, r := range rs {
		if r.Len <= 0 {
			continue
		}
		if n := len(out); n > 0 && r.Off <= out[n-1].Off+out[n-1].Len {
			out[n-1].Len = max(out[n-1].Off+out[n-1].Len, r.Off+r.Len) - out[n-1].Off
			continue
		}
		out = append(out, r)
	}
	return out
}
