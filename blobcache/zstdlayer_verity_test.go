package blobcache_test

import (
	"bytes"
	"io"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/internal/zstdran"
)

// zstdFrames compresses b in frames of frame bytes each, as EncodeAll
// makes them (with checksums), one after the other.
func zstdFrames(t testing.TB, b []byte, frame int) []byte {
	t.Helper()
	e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	var out []byte
	for off := 0; off < len(b); off += frame {
		out = e.EncodeAll(b[off:min(off+frame, len(b))], out)
	}
	return out
}

// zstdDevice is verityDevice with its first layer stored as zstd frames
// of 16 KiB (four or five to a 64 KiB span).
type zstdDevice struct {
	*verityDevice
	raw *memBackend
	idx *zstdran.Index // as a reader decodes it
}

func newZstdDevice(t testing.TB) *zstdDevice {
	t.Helper()
	d := &zstdDevice{verityDevice: newVerityDevice(t)}
	stored := zstdFrames(t, d.plainA, 16<<10)
	x := zstdran.NewIndexer(bytes.NewReader(stored), testSpan)
	defer x.Close()
	if _, err := io.Copy(io.Discard, x); err != nil {
		t.Fatal(err)
	}
	idx, err := x.Index()
	if err != nil {
		t.Fatal(err)
	}
	table, _ := idx.MarshalBinary()
	d.idx = new(zstdran.Index)
	if err := d.idx.UnmarshalBinary(table); err != nil {
		t.Fatal(err)
	}
	if len(d.idx.Checkpoints) < 4 {
		t.Fatalf("%d checkpoints", len(d.idx.Checkpoints))
	}
	d.raw = &memBackend{data: stored}
	return d
}

// openZstd returns the handle of the zstd layer through c, checked
// against the tree, and its SpanLayer.
func (d *zstdDevice) openZstd(t testing.TB, c *blobcache.Cache, unitSize int64) (*blobcache.Handle, *blobcache.SpanLayer) {
	t.Helper()
	zl, err := blobcache.NewZstdLayer(d.raw, d.idx)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := d.openLayer(t, c, unitSize, zl)
	return a, zl
}

// A cold 4 KiB read of the zstd layer is one stored range read, of the
// frames of the spans its 64 KiB group touches and nothing else; every
// byte reads right.
func TestZstdLayerRead(t *testing.T) {
	d := newZstdDevice(t)
	c, err := blobcache.OpenMemory(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a, zl := d.openZstd(t, c, 64<<10)
	reads0, n0 := zl.RawStats() // the bootstrap's check read the layer's start
	mid := int64(len(d.plainA) / 2)
	buf := make([]byte, 4096)
	if _, err := a.ReadAt(buf, mid); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, d.plainA[mid:mid+4096]) {
		t.Fatal("4 KiB read: wrong bytes")
	}
	reads, n := zl.RawStats()
	reads, n = reads-reads0, n-n0
	cps := d.idx.Checkpoints
	ustart := max(0, (d.offA+mid)/(64<<10)*(64<<10)-d.offA)
	first, last := d.idx.Find(ustart), d.idx.Find(ustart+64<<10-1)
	want := d.idx.CompressedSize - cps[first].In
	if last+1 < len(cps) {
		want = cps[last+1].In - cps[first].In
	}
	if reads != 1 || n != want {
		t.Fatalf("cold 4 KiB read: %d stored reads, %d bytes; want 1 read of the %d bytes of spans [%d, %d]", reads, n, want, first, last)
	}
	t.Logf("cold 4 KiB read: %d stored read, %d bytes of %d", reads, n, len(d.raw.data))
	if got := readAll(t, a, int64(len(d.plainA)), 12345); !bytes.Equal(got, d.plainA) {
		t.Fatal("zstd layer: wrong bytes")
	}
}

// A changed stored byte fails the reads of the units that need its span,
// and only those; no read serves wrong bytes.
func TestZstdLayerDamage(t *testing.T) {
	d := newZstdDevice(t)
	k := len(d.idx.Checkpoints) / 2
	bad := d.idx.Checkpoints[k].In + 3000 // inside the span's first frame
	d.raw.setHook(func(p []byte, off int64) error {
		if bad >= off && bad < off+int64(len(p)) {
			p[bad-off] ^= 0x20
		}
		return nil
	})
	c, err := blobcache.OpenMemory(&blobcache.Options{FetchAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const unit = 64 << 10
	a, _ := d.openZstd(t, c, unit)
	spanLo, spanHi := d.idx.Checkpoints[k].Out, d.idx.Checkpoints[k+1].Out
	phase := d.offA % unit
	good, failed := 0, 0
	for lo := int64(0); lo < int64(len(d.plainA)); {
		hi := min(int64(len(d.plainA)), (lo+phase)/unit*unit+unit-phase)
		buf := make([]byte, hi-lo)
		_, err := a.ReadAt(buf, lo)
		touches := lo < spanHi && hi > spanLo
		switch {
		case err == nil && !bytes.Equal(buf, d.plainA[lo:hi]):
			t.Fatalf("[%d, %d): wrong bytes served", lo, hi)
		case err == nil && touches:
			t.Fatalf("[%d, %d): read, but it needs damaged span %d [%d, %d)", lo, hi, k, spanLo, spanHi)
		case err != nil && !touches:
			t.Fatalf("[%d, %d): %v, but the damage is in span %d [%d, %d)", lo, hi, err, k, spanLo, spanHi)
		case err == nil:
			good++
		default:
			failed++
			if failed == 1 {
				t.Logf("[%d, %d): %v", lo, hi, err)
			}
		}
		lo = hi
	}
	if failed == 0 || good == 0 {
		t.Fatalf("%d units good, %d failed", good, failed)
	}
	t.Logf("%d units good, %d failed", good, failed)
}

// A table whose spans are larger than MaxZstdSpan (frames too large, or a
// table that lies) is refused rather than decoded and held whole.
func TestZstdLayerSpanTooLarge(t *testing.T) {
	idx := &zstdran.Index{Span: 1 << 20, CompressedSize: 1 << 20, UncompressedSize: 3 * blobcache.MaxZstdSpan, Frames: 3,
		Checkpoints: []zstdran.Checkpoint{{}, {In: 1000, Out: blobcache.MaxZstdSpan}, {In: 2000, Out: blobcache.MaxZstdSpan + 1<<20}}}
	if _, err := blobcache.NewZstdLayer(&memBackend{}, idx); err == nil {
		t.Fatal("a span larger than MaxZstdSpan was accepted")
	}
	idx.Checkpoints[2].Out = 2 * blobcache.MaxZstdSpan
	if _, err := blobcache.NewZstdLayer(&memBackend{}, idx); err != nil {
		t.Fatalf("spans of MaxZstdSpan: %v", err)
	}
}
