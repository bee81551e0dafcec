package blobcache_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/internal/gzran"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// verityDevice is a composed tarfs device for the tests: a bootstrap that
// ends off a group boundary, a gzip layer and a plain layer at 512-byte
// (not 64 KiB) aligned offsets, zeros between, and its level-1 digests.
type verityDevice struct {
	boot, plainA, plainB []byte
	gzA                  []byte
	idxA                 *gzran.Index // as the Indexer made it, windows included
	tableA               *gzran.Index // as a reader decodes it: windows in windowsA
	offA, offB, size     int64
	level1               []byte
	entries              [2]rafs.BlobEntry
	rawA, rawB, windowsA *memBackend
}

const testSpan = 64 << 10

func layerBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, 0, n)
	for len(b) < n {
		if rng.IntN(3) == 0 {
			for range 200 {
				b = append(b, byte(rng.Uint32()))
			}
		} else {
			b = fmt.Appendf(b, "line %d of a fairly compressible layer\n", rng.IntN(50))
		}
	}
	return b[:n]
}

func newVerityDevice(t testing.TB) *verityDevice {
	t.Helper()
	rng := rand.New(rand.NewPCG(7, 7))
	d := &verityDevice{boot: layerBytes(rng, 71*512), plainA: layerBytes(rng, 1000*512), plainB: layerBytes(rng, 700*512)}
	d.offA = 72 * 512
	d.offB = d.offA + int64(len(d.plainA)) + 3*512
	d.size = d.offB + int64(len(d.plainB))
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(d.plainA)
	zw.Close()
	d.gzA = gz.Bytes()
	x := gzran.NewIndexer(bytes.NewReader(d.gzA), testSpan)
	if _, err := io.Copy(io.Discard, x); err != nil {
		t.Fatal(err)
	}
	var err error
	if d.idxA, err = x.Index(); err != nil {
		t.Fatal(err)
	}
	if len(d.idxA.Checkpoints) < 4 {
		t.Fatalf("%d checkpoints", len(d.idxA.Checkpoints))
	}
	// The level-1 digests, computed here the plain way.
	dev := d.device()
	for g := 0; g < len(dev); g += blobcache.VerityGroupSize {
		var hb [4096]byte
		n := 0
		for k := g; k < min(g+blobcache.VerityGroupSize, len(dev)); k += 512 {
			s := sha256.Sum256(dev[k : k+512])
			n += copy(hb[n:], s[:])
		}
		s := sha256.Sum256(hb[:])
		d.level1 = append(d.level1, s[:]...)
	}
	for i, plain := range [][]byte{d.plainA, d.plainB} {
		e := &d.entries[i]
		e.Features = rafs.BlobFeatureTarfs | rafs.BlobFeatureCapTarTOC
		e.Compressor, e.Digester, e.ChunkSize = rafs.CompressNone, rafs.DigestSHA256, 1<<20
		e.CompressedSize, e.UncompressedSize = uint64(len(plain)), uint64(len(plain))
		s := sha256.Sum256(plain)
		copy(e.BlobID[:], hex.EncodeToString(s[:]))
	}
	d.rawA, d.rawB = &memBackend{data: d.gzA}, &memBackend{data: d.plainB}
	table, _ := d.idxA.MarshalBinary()
	d.tableA = new(gzran.Index)
	if err := d.tableA.UnmarshalBinary(table); err != nil {
		t.Fatal(err)
	}
	d.windowsA = &memBackend{data: d.idxA.Windows()}
	return d
}

func (d *verityDevice) device() []byte {
	dev := make([]byte, d.size)
	copy(dev, d.boot)
	copy(dev[d.offA:], d.plainA)
	copy(dev[d.offB:], d.plainB)
	return dev
}

// reader reads the composed device through the blobs' handles.
func (d *verityDevice) reader(a, b *blobcache.Handle) blobcache.DeviceReader {
	return devReader{d, a, b}
}

type devReader struct {
	d    *verityDevice
	a, b *blobcache.Handle
}

func (r devReader) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	clear(p)
	end := off + int64(len(p))
	copy(p, r.d.boot[min(off, int64(len(r.d.boot))):min(end, int64(len(r.d.boot)))])
	for _, x := range []struct {
		h   *blobcache.Handle
		at  int64
		len int64
	}{{r.a, r.d.offA, int64(len(r.d.plainA))}, {r.b, r.d.offB, int64(len(r.d.plainB))}} {
		lo, hi := max(off, x.at), min(end, x.at+x.len)
		if lo < hi {
			if _, err := x.h.ReadAtContext(ctx, p[lo-off:hi-off], lo-x.at); err != nil {
				return 0, err
			}
		}
	}
	return len(p), nil
}

// open returns the handles of both blobs through c, checked against the
// tree (unitSize: the cache unit), the first read through a gzip layer.
func (d *verityDevice) open(t testing.TB, c *blobcache.Cache, unitSize int64) (a, b *blobcache.Handle, gl *blobcache.SpanLayer) {
	t.Helper()
	gl, err := blobcache.NewGzipLayer(d.rawA, d.windowsA, d.tableA)
	if err != nil {
		t.Fatal(err)
	}
	a, b = d.openLayer(t, c, unitSize, gl)
	return a, b, gl
}

// openLayer is open with the first blob's uncompressed bytes read from
// layerA.
func (d *verityDevice) openLayer(t testing.TB, c *blobcache.Cache, unitSize int64, layerA blobcache.Backend) (a, b *blobcache.Handle) {
	t.Helper()
	v, err := blobcache.NewDeviceVerity(d.level1, false, d.size, d.boot, []blobcache.VerityExtent{
		{ID: d.entries[0].ID(), Offset: d.offA, Length: int64(len(d.plainA)), Raw: layerA},
		{ID: d.entries[1].ID(), Offset: d.offB, Length: int64(len(d.plainB)), Raw: d.rawB},
	}, unitSize)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if a, err = c.OpenBlob(ctx, v.Store(), &d.entries[0], nil); err != nil {
		t.Fatal(err)
	}
	if b, err = c.OpenBlob(ctx, v.Store(), &d.entries[1], nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	if err := v.CheckBootstrap(ctx, d.reader(a, b)); err != nil {
		t.Fatal(err)
	}
	return a, b
}

// Every byte of both layers reads right through a disk and a memory
// cache; a cold 4 KiB read of the gzip layer is one stored read of at
// most one span's compressed bytes (plus the checkpoint's byte) and one
// read of the checkpoint's window.
func TestVerifiedLayersRead(t *testing.T) {
	d := newVerityDevice(t)
	for _, mode := range []string{"disk", "memory"} {
		t.Run(mode, func(t *testing.T) {
			var c *blobcache.Cache
			if mode == "disk" {
				c = openCache(t, t.TempDir(), nil)
			} else {
				var err error
				if c, err = blobcache.OpenMemory(nil); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
			}
			a, b, gl := d.open(t, c, 64<<10)
			reads0, n0 := gl.RawStats() // the bootstrap's check read the layer's start
			buf := make([]byte, 4096)
			mid := int64(len(d.plainA) / 2)
			if _, err := a.ReadAt(buf, mid); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, d.plainA[mid:mid+4096]) {
				t.Fatal("4 KiB read: wrong bytes")
			}
			reads, n := gl.RawStats()
			reads, n = reads-reads0, n-n0
			// The read's unit is one 64 KiB group of the device; the
			// stored bytes are those of the spans it touches.
			cps := d.idxA.Checkpoints
			ustart := max(0, (d.offA+mid)/(64<<10)*(64<<10)-d.offA)
			first, last := d.idxA.Find(ustart), d.idxA.Find(ustart+64<<10-1)
			limit := d.idxA.CompressedSize - cps[first].In/8
			if last+1 < len(cps) {
				limit = (cps[last+1].In+7)/8 + 1 - cps[first].In/8
			}
			window := int64(cps[first].WindowStored)
			if reads != 2 || n > limit+window {
				t.Fatalf("cold 4 KiB read: %d stored reads, %d bytes (the spans it needs: %d compressed bytes, its window %d)", reads, n, limit, window)
			}
			t.Logf("cold 4 KiB read: %d stored read(s), %d bytes of %d", reads, n, len(d.gzA))
			if got := readAll(t, a, int64(len(d.plainA)), 12345); !bytes.Equal(got, d.plainA) {
				t.Fatal("gzip layer: wrong bytes")
			}
			if got := readAll(t, b, int64(len(d.plainB)), 4096); !bytes.Equal(got, d.plainB) {
				t.Fatal("plain layer: wrong bytes")
			}
		})
	}
}

// A changed byte of a layer (in the registry, say) fails the units whose
// groups hold it, with ErrDigestMismatch, and only those; the failed
// units are not cached, so a restart over a backend that is gone serves
// the good units and fails the others.
func TestVerifiedLayersDamage(t *testing.T) {
	d := newVerityDevice(t)
	dir := t.TempDir()
	const unit = 128 << 10
	bad := int64(len(d.plainB)/2 + 1000)
	d.rawB.setHook(func(p []byte, off int64) error {
		if bad >= off && bad < off+int64(len(p)) {
			p[bad-off] ^= 1
		}
		return nil
	})
	// The gzip layer's stored bytes are damaged in its last span (the
	// last checkpoint sits at the end of the data).
	lastCP := d.idxA.Find(int64(len(d.plainA)) - 1)
	gzBad := d.idxA.Checkpoints[lastCP].In/8 + 50
	d.rawA.setHook(func(p []byte, off int64) error {
		if gzBad >= off && gzBad < off+int64(len(p)) {
			p[gzBad-off] ^= 0x40
		}
		return nil
	})
	badUnitB := (d.offB%unit + bad) / unit
	c := openCache(t, dir, &blobcache.Options{FetchAttempts: 1})
	a, b, _ := d.open(t, c, unit)
	check := func(h *blobcache.Handle, plain []byte, off0 int64, badFrom int64, label string) (good, failed int) {
		t.Helper()
		phase := off0 % unit
		for lo := int64(0); lo < int64(len(plain)); {
			hi := min(int64(len(plain)), (lo+phase)/unit*unit+unit-phase)
			buf := make([]byte, hi-lo)
			_, err := h.ReadAt(buf, lo)
			switch {
			case err == nil && bytes.Equal(buf, plain[lo:hi]):
				good++
			case err == nil:
				t.Fatalf("%s [%d, %d): wrong bytes served", label, lo, hi)
			case !errors.Is(err, blobcache.ErrDigestMismatch) && label == "plain":
				t.Fatalf("%s [%d, %d): %v, want a digest mismatch", label, lo, hi, err)
			case hi <= badFrom:
				t.Fatalf("%s [%d, %d): %v, but the damage is at %d", label, lo, hi, err, badFrom)
			default:
				failed++
			}
			lo = hi
		}
		return good, failed
	}
	goodB, failedB := check(b, d.plainB, d.offB, (badUnitB*unit)-d.offB%unit, "plain")
	if failedB != 1 || goodB == 0 {
		t.Fatalf("plain layer: %d units good, %d failed; want exactly the damaged one to fail", goodB, failedB)
	}
	lastSpan := d.idxA.Checkpoints[lastCP].Out
	goodA, failedA := check(a, d.plainA, d.offA, lastSpan/unit*unit-d.offA%unit-unit, "gzip")
	if failedA == 0 || goodA == 0 {
		t.Fatalf("gzip layer: %d units good, %d failed", goodA, failedA)
	}
	t.Logf("plain layer: %d good, %d failed; gzip layer: %d good, %d failed", goodB, failedB, goodA, failedA)
	a.Close()
	b.Close()
	c.Close()

	// Restart with backends that fail every read: the good units come
	// from the cache, the failed ones are not there.
	gone := func([]byte, int64) error { return errors.New("backend gone") }
	d.rawA.setHook(gone)
	d.rawB.setHook(gone)
	c = openCache(t, dir, &blobcache.Options{FetchAttempts: 1})
	a, b, _ = d.open(t, c, unit)
	if g, f := check(b, d.plainB, d.offB, (badUnitB*unit)-d.offB%unit, "plain-restart"); g != goodB || f != failedB {
		t.Fatalf("after restart: plain layer %d good %d failed, before %d and %d", g, f, goodB, failedB)
	}
	if g, _ := check(a, d.plainA, d.offA, lastSpan/unit*unit-d.offA%unit-unit, "gzip-restart"); g != goodA {
		t.Fatalf("after restart: gzip layer %d good, before %d", g, goodA)
	}
}

// Units cached unchecked (the same blob opened as a plain tarfs blob) are
// not taken as checked when the blob is opened with a verifier.
func TestVerifiedIgnoresUncheckedCache(t *testing.T) {
	d := newVerityDevice(t)
	dir := t.TempDir()
	damaged := bytes.Clone(d.plainB)
	damaged[100] ^= 1
	c := openCache(t, dir, &blobcache.Options{TarfsUnitSize: 64 << 10})
	h, err := c.OpenBlob(context.Background(), backendStore{&memBackend{data: damaged}}, &d.entries[1], nil)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, h, int64(len(damaged)), 64<<10)
	h.Close()
	c.Close()
	d.rawB.setHook(func([]byte, int64) error { return errors.New("backend gone") })
	c = openCache(t, dir, &blobcache.Options{TarfsUnitSize: 64 << 10})
	_, b, _ := d.open(t, c, 64<<10)
	if _, err := b.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("bytes cached unchecked were served as checked")
	}
}

// A bootstrap that does not match the tree is refused before anything is
// served.
func TestVerifiedBootstrapRefused(t *testing.T) {
	d := newVerityDevice(t)
	d.boot[len(d.boot)-1] ^= 1
	v, err := blobcache.NewDeviceVerity(d.level1, false, d.size, d.boot, []blobcache.VerityExtent{
		{ID: d.entries[1].ID(), Offset: d.offB, Length: int64(len(d.plainB)), Raw: d.rawB},
		{ID: d.entries[0].ID(), Offset: d.offA, Length: int64(len(d.plainA)), Raw: &memBackend{data: d.plainA}},
	}, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	c := openCache(t, t.TempDir(), nil)
	ctx := context.Background()
	a, err := c.OpenBlob(ctx, v.Store(), &d.entries[0], nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.OpenBlob(ctx, v.Store(), &d.entries[1], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	if err := v.CheckBootstrap(ctx, d.reader(a, b)); !errors.Is(err, blobcache.ErrDigestMismatch) {
		t.Fatalf("damaged bootstrap: %v", err)
	}
}

// A damaged window in the windows blob fails the reads that resume at
// its checkpoint, and only those; it is not kept, so once the blob reads
// right again so does the layer; a good window is fetched once.
func TestGzipLayerWindowDamage(t *testing.T) {
	d := newVerityDevice(t)
	cps := d.tableA.Checkpoints
	k := len(cps) / 2
	damaged := true
	d.windowsA.setHook(func(p []byte, off int64) error {
		if at := cps[k].WindowAt; damaged && at >= off && at < off+int64(len(p)) {
			p[at-off] ^= 1
		}
		return nil
	})
	c, err := blobcache.OpenMemory(&blobcache.Options{FetchAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a, _, gl := d.open(t, c, 64<<10)
	buf := make([]byte, 512)
	at := func(i int) int64 { return cps[i].Out + (d.spanEnd(i)-cps[i].Out)/2/512*512 }
	if _, err := a.ReadAt(buf, at(k)); err == nil {
		t.Fatal("a read resuming at the damaged window succeeded")
	}
	if _, err := a.ReadAt(buf, at(k-1)); err != nil || !bytes.Equal(buf, d.plainA[at(k-1):at(k-1)+512]) {
		t.Fatalf("a read at another checkpoint: %v", err)
	}
	damaged = false
	if _, err := a.ReadAt(buf, at(k)); err != nil || !bytes.Equal(buf, d.plainA[at(k):at(k)+512]) {
		t.Fatalf("after the windows blob was repaired: %v", err)
	}
	if got := readAll(t, a, int64(len(d.plainA)), 64<<10); !bytes.Equal(got, d.plainA) {
		t.Fatal("wrong bytes")
	}
	// Every window is kept now: decoding every span again reads none.
	before := d.windowsA.reads.Load()
	gl.Forget(0, int64(len(d.plainA)))
	all := make([]byte, len(d.plainA))
	if _, err := gl.ReadAt(context.Background(), all, 0); err != nil || !bytes.Equal(all, d.plainA) {
		t.Fatalf("reading the layer again: %v", err)
	}
	if n := d.windowsA.reads.Load() - before; n != 0 {
		t.Fatalf("%d window reads for windows already fetched", n)
	}
}

func (d *verityDevice) spanEnd(i int) int64 {
	if i+1 < len(d.tableA.Checkpoints) {
		return d.tableA.Checkpoints[i+1].Out
	}
	return int64(len(d.plainA))
}

// The prefetch of one blob waits while a read of another blob of the
// cache waits for a fetch: the blobs of an image share one link, and
// "low priority to reads" must hold across them.
func TestPrefetchYieldsToOtherBlobsReads(t *testing.T) {
	d := newVerityDevice(t)
	c := openCache(t, t.TempDir(), nil)
	a, b, _ := d.open(t, c, 64<<10)
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	d.rawA.setHook(func([]byte, int64) error {
		once.Do(func() { close(entered) })
		<-release
		return nil
	})
	readDone := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		_, err := a.ReadAt(buf, int64(len(d.plainA))-4096)
		readDone <- err
	}()
	<-entered
	before := d.rawB.reads.Load()
	b.PrefetchAll()
	time.Sleep(100 * time.Millisecond)
	if n := d.rawB.reads.Load() - before; n != 0 {
		close(release)
		t.Fatalf("blob b's prefetch made %d reads while a read of blob a waited for its fetch", n)
	}
	close(release)
	if err := <-readDone; err != nil {
		t.Fatal(err)
	}
	if err := b.WaitPrefetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := d.rawB.reads.Load() - before; n == 0 {
		t.Fatal("blob b was not prefetched once the read was done")
	}
}
