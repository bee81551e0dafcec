package mounter

import (
	"strings"
	"sync/atomic"
	"testing"
)

// fetchingDev is a device whose reads of the first half go to a backend
// (counted), and of the second half hit the cache.
type fetchingDev struct {
	size    int64
	fetches atomic.Int64
}

func (d *fetchingDev) Size() int64 { return d.size }

func (d *fetchingDev) ReadAt(p []byte, off int64) (int, error) {
	if off < d.size/2 {
		d.fetches.Add(1)
	}
	return len(p), nil
}

// A read during which the backend was asked is a miss; the rest are hits;
// status shows the rate with the blob cache figures.
func TestCountedHitRate(t *testing.T) {
	dev := &fetchingDev{size: 1 << 20}
	c := newCounted(dev, dev.fetches.Load)
	buf := make([]byte, 4096)
	for off := int64(0); off < dev.size; off += 4096 {
		if _, err := c.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	st := c.stats()
	if st.Reads != 256 || st.CacheMisses != 128 || st.CacheHits != 128 {
		t.Fatalf("reads %d, misses %d, hits %d; want 256, 128, 128", st.Reads, st.CacheMisses, st.CacheHits)
	}
	st.Extra = map[string]int64{ExtraFetchedBytes: 100, ExtraFetchRequests: 2, ExtraCachedBytes: 300, ExtraCachedUnits: 3, ExtraUnits: 4}
	line := st.String()
	for _, want := range []string{"fetched 100 bytes in 2 requests", "cached 300 bytes (3 of 4 chunks)", "hit rate 50.0%"} {
		if !strings.Contains(line, want) {
			t.Errorf("status line %q lacks %q", line, want)
		}
	}
	// Without a backend count there is no rate to show.
	if s := newCounted(dev, nil).stats(); s.CacheHits+s.CacheMisses != 0 || strings.Contains(s.String(), "hit rate") {
		t.Errorf("hit rate without Fetches: %+v", s)
	}
}

// A mount's NBD device is tagged by image and mountpoint: the same image
// mounted twice gets two tags, and a long image name still fits the
// kernel's limit.
func TestNBDBackendID(t *testing.T) {
	a, b := nbdBackendID("rafsnbd:image:/x.boot", "/mnt/a"), nbdBackendID("rafsnbd:image:/x.boot", "/mnt/b")
	if a == b || !strings.HasSuffix(a, ":rafsnbd:image:/x.boot") {
		t.Errorf("ids %q and %q", a, b)
	}
	long := nbdBackendID(strings.Repeat("x", 4000), "/mnt/a")
	if len(long) > 512 || long == nbdBackendID(strings.Repeat("y", 4000), "/mnt/a") {
		t.Errorf("long image id: %q", long)
	}
}
