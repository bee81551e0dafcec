package mounter

import (
	"context"
	"encoding/json"
	"errors"
	"math/bits"
	"net"
	"os"
	"sync/atomic"
	"time"
)

// Device is what a mount serves: random-access reads over a fixed size,
// safe for concurrent use; with ReadAtContext when reads may wait.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	Size() int64
}

type contextReader interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// Stats are a daemon's counters, as `rafsnbd status` shows them.
type Stats struct {
	Reads      uint64 `json:"reads"`
	BytesRead  uint64 `json:"bytes_read"`
	ReadErrors uint64 `json:"read_errors"`
	// Read latency percentiles of device reads, in microseconds (upper
	// bounds of power-of-two buckets).
	P50Micros uint64 `json:"p50_us"`
	P99Micros uint64 `json:"p99_us"`
	// CacheHits and CacheMisses count device reads that did not, and
	// did, overlap a backend request (Options.Fetches); with concurrent
	// readers a hit may be counted as a miss, never the other way.
	CacheHits   uint64 `json:"cache_hits,omitempty"`
	CacheMisses uint64 `json:"cache_misses,omitempty"`
	// Extra holds source-specific figures (blob cache hits and fetches).
	Extra map[string]int64 `json:"extra,omitempty"`
}

// counted is a Device that counts its reads and their latency. It keeps
// the device's ReadAtContext and MayStall.
type counted struct {
	dev     Device
	ctxDev  contextReader
	stall   bool
	fetches func() int64
	hits    atomic.Uint64
	misses  atomic.Uint64
	reads   atomic.Uint64
	bytes   atomic.Uint64
	errs    atomic.Uint64
	latency [40]atomic.Uint64 // bucket i: under 2^i µs
}

func newCounted(dev Device, fetches func() int64) *counted {
	c := &counted{dev: dev, fetches: fetches}
	c.ctxDev, _ = dev.(contextReader)
	if s, ok := dev.(interface{ MayStall() bool }); ok {
		c.stall = s.MayStall()
	}
	return c
}

func (c *counted) Size() int64    { return c.dev.Size() }
func (c *counted) MayStall() bool { return c.stall }

func (c *counted) ReadAt(p []byte, off int64) (int, error) {
	return c.ReadAtContext(context.Background(), p, off)
}

func (c *counted) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	start := time.Now()
	var before int64
	if c.fetches != nil {
		before = c.fetches()
	}
	var n int
	var err error
	if c.ctxDev != nil {
		n, err = c.ctxDev.ReadAtContext(ctx, p, off)
	} else {
		n, err = c.dev.ReadAt(p, off)
	}
	us := uint64(time.Since(start).Microseconds())
	c.latency[min(bits.Len64(us), len(c.latency)-1)].Add(1)
	c.reads.Add(1)
	c.bytes.Add(uint64(n))
	if c.fetches != nil {
		if c.fetches() == before {
			c.hits.Add(1)
		} else {
			c.misses.Add(1)
		}
	}
	if err != nil && n != len(p) {
		c.errs.Add(1)
	}
	return n, err
}

func (c *counted) stats() Stats {
	s := Stats{Reads: c.reads.Load(), BytesRead: c.bytes.Load(), ReadErrors: c.errs.Load(),
		CacheHits: c.hits.Load(), CacheMisses: c.misses.Load()}
	var counts [len(c.latency)]uint64
	var total uint64
	for i := range c.latency {
		counts[i] = c.latency[i].Load()
		total += counts[i]
	}
	pct := func(q uint64) uint64 {
		if total == 0 {
			return 0
		}
		want := (total*q + 99) / 100
		var seen uint64
		for i, n := range counts {
			seen += n
			if seen >= want {
				return 1 << i
			}
		}
		return 0
	}
	s.P50Micros, s.P99Micros = pct(50), pct(99)
	return s
}

// serveStats answers every connection on the unix socket at path with the
// current stats as JSON, until ctx is done.
func serveStats(ctx context.Context, path string, get func() Stats) (func(), error) {
	_ = os.Remove(path) // a dead daemon's socket
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			_ = conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
			_ = json.NewEncoder(conn).Encode(get())
			conn.Close()
		}
	}()
	return func() { l.Close() }, nil
}

// queryStats asks a daemon for its stats.
func queryStats(ctx context.Context, path string) (*Stats, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	var s Stats
	if err := json.NewDecoder(conn).Decode(&s); err != nil {
		return nil, errors.New("no stats from the daemon: " + err.Error())
	}
	return &s, nil
}
