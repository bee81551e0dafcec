package blobcache_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/rafs"
)

var allCompressors = []rafs.Compressor{rafs.CompressNone, rafs.CompressLZ4Block, rafs.CompressGzip, rafs.CompressZstd}

// TestRandomReads checks random reads of every compressor and digester
// against the uncompressed space the blob was built from, from several
// goroutines at once, and that each unit was fetched once.
func TestRandomReads(t *testing.T) {
	for _, comp := range allCompressors {
		for _, dig := range []rafs.Digester{rafs.DigestBlake3, rafs.DigestSHA256} {
			t.Run(comp.String()+"-"+dig.String(), func(t *testing.T) {
				tb := makeBlob(t, comp, dig, 24, 64<<10, uint64(comp)*10+uint64(dig))
				be := &memBackend{data: tb.stored}
				cache := openCache(t, t.TempDir(), &blobcache.Options{MaxFetchSize: 256 << 10})
				blob, err := cache.OpenBlob(context.Background(), backendStore{be}, &tb.entry, tb.table)
				if err != nil {
					t.Fatal(err)
				}
				defer blob.Close()
				if blob.Size() != int64(len(tb.plain)) {
					t.Fatalf("Size %d, want %d", blob.Size(), len(tb.plain))
				}
				var wg sync.WaitGroup
				errs := make(chan error, 8)
				for g := range 8 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						rng := rand.New(rand.NewPCG(uint64(g), 1))
						for range 200 {
							off := rng.Int64N(blob.Size())
							n := 1 + rng.IntN(100<<10)
							p := make([]byte, n)
							got, err := blob.ReadAt(p, off)
							want := tb.plain[off:min(off+int64(n), int64(len(tb.plain)))]
							if got != len(want) || (err != nil && !(err == io.EOF && got < n)) {
								errs <- fmt.Errorf("ReadAt(%d, +%d) = %d, %v; want %d", off, n, got, err, len(want))
								return
							}
							if !bytes.Equal(p[:got], want) {
								errs <- fmt.Errorf("ReadAt(%d, +%d): wrong bytes", off, n)
								return
							}
						}
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Fatal(err)
				}
				if got := readAll(t, blob, blob.Size(), 33333); !bytes.Equal(got, tb.plain) {
					t.Fatal("full read differs")
				}
				st := blob.Stats()
				if st.ReadyUnits != 24 || st.DigestErrors != 0 || st.FetchErrors != 0 {
					t.Errorf("stats %+v", st)
				}
				// Fetch dedup: no unit's stored bytes came twice.
				if st.BackendBytes > int64(tb.entry.CIOffset)+int64(24*16<<10) {
					t.Errorf("%d stored bytes fetched for a %d-byte chunk area", st.BackendBytes, tb.entry.CIOffset)
				}
			})
		}
	}
}

// TestMergeAndDedup: a read spanning several missing chunks makes one
// backend request (bounded by MaxFetchSize); concurrent readers of one
// chunk share a single fetch.
func TestMergeAndDedup(t *testing.T) {
	tb := makeBlob(t, rafs.CompressZstd, rafs.DigestBlake3, 16, 64<<10, 3)
	be := &memBackend{data: tb.stored}
	cache := openCache(t, t.TempDir(), &blobcache.Options{MaxFetchSize: 1 << 30})
	blob, err := cache.OpenBlob(context.Background(), backendStore{be}, &tb.entry, tb.table)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	base := be.reads.Load()

	// Chunks 2..9 in one read: one request.
	lo, hi := tb.chunks[2].UncompressedOffset, tb.chunks[9].UncompressedOffset+1
	p := make([]byte, hi-lo)
	if _, err := blob.ReadAt(p, int64(lo)); err != nil {
		t.Fatal(err)
	}
	if n := be.reads.Load() - base; n != 1 {
		t.Errorf("read over 8 missing chunks made %d backend requests, want 1", n)
	}

	// 32 readers of chunk 12 while the backend is slow: one request.
	release := make(chan struct{})
	be.setHook(func([]byte, int64) error { <-release; return nil })
	base = be.reads.Load()
	var wg sync.WaitGroup
	c := tb.chunks[12]
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := make([]byte, c.UncompressedSize)
			if _, err := blob.ReadAt(q, int64(c.UncompressedOffset)); err != nil {
				t.Error(err)
			}
		}()
	}
	time.Sleep(50 * time.Millisecond) // let them all queue behind the first fetch
	close(release)
	wg.Wait()
	if n := be.reads.Load() - base; n != 1 {
		t.Errorf("32 concurrent readers of one chunk made %d backend requests, want 1", n)
	}

	// A small MaxFetchSize splits requests.
	cache2 := openCache(t, t.TempDir(), &blobcache.Options{MaxFetchSize: 1})
	be2 := &memBackend{data: tb.stored}
	blob2, err := cache2.OpenBlob(context.Background(), backendStore{be2}, &tb.entry, tb.table)
	if err != nil {
		t.Fatal(err)
	}
	defer blob2.Close()
	base = be2.reads.Load()
	if _, err := blob2.ReadAt(p, int64(lo)); err != nil {
		t.Fatal(err)
	}
	if n := be2.reads.Load() - base; n != 8 {
		t.Errorf("with MaxFetchSize 1: %d requests, want one per chunk (8)", n)
	}
}

// TestTarfs caches a tarfs blob in fixed units without digests.
func TestTarfs(t *testing.T) {
	tb := makeTarfsBlob(5<<20+12345, 1)
	be := &memBackend{data: tb.stored}
	dir := t.TempDir()
	cache := openCache(t, dir, &blobcache.Options{TarfsUnitSize: 1 << 20})
	blob, err := cache.OpenBlob(context.Background(), backendStore{be}, &tb.entry, nil)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 100)
	if _, err := blob.ReadAt(p, 3<<20+5); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, tb.plain[3<<20+5:3<<20+105]) {
		t.Fatal("wrong bytes")
	}
	if st := blob.Stats(); st.Units != 6 || st.ReadyUnits != 1 || st.BackendBytes != 1<<20 {
		t.Errorf("after one small read: %+v, want 6 units, 1 ready, 1 MiB fetched", st)
	}
	if got := readAll(t, blob, blob.Size(), 700<<10); !bytes.Equal(got, tb.plain) {
		t.Fatal("full read differs")
	}
	// The last read of the space: short, with io.EOF.
	q := make([]byte, 20000)
	n, err := blob.ReadAt(q, blob.Size()-10000)
	if n != 10000 || err != io.EOF || !bytes.Equal(q[:n], tb.plain[len(tb.plain)-10000:]) {
		t.Errorf("read across the end: %d, %v", n, err)
	}
	if n, err := blob.ReadAt(q, blob.Size()); n != 0 || err != io.EOF {
		t.Errorf("read at the end: %d, %v", n, err)
	}
	blob.Close()
	cache.Close()

	cache2 := openCache(t, dir, &blobcache.Options{TarfsUnitSize: 1 << 20})
	be2 := &memBackend{data: tb.stored}
	blob2, err := cache2.OpenBlob(context.Background(), backendStore{be2}, &tb.entry, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer blob2.Close()
	if got := readAll(t, blob2, blob2.Size(), 1<<20); !bytes.Equal(got, tb.plain) {
		t.Fatal("full read after restart differs")
	}
	if n := be2.reads.Load(); n != 0 {
		t.Errorf("after restart: %d backend reads", n)
	}
	cache2.Close()

	// Another unit size makes a new map: the old one is not trusted.
	cache3 := openCache(t, dir, &blobcache.Options{TarfsUnitSize: 64 << 10})
	be3 := &memBackend{data: tb.stored}
	blob3, err := cache3.OpenBlob(context.Background(), backendStore{be3}, &tb.entry, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer blob3.Close()
	if st := blob3.Stats(); st.ReadyUnits != 0 || st.Units != 81 {
		t.Errorf("new unit size: %+v, want 81 units none ready", st)
	}
}

// TestBackendFaults: failing, short and corrupting backends give errors,
// never wrong bytes; a fault that goes away heals on the next read, and
// chunks the fault does not touch keep working throughout.
func TestBackendFaults(t *testing.T) {
	tb := makeBlob(t, rafs.CompressLZ4Block, rafs.DigestSHA256, 8, 64<<10, 5)
	be := &memBackend{data: tb.stored}
	cache := openCache(t, t.TempDir(), &blobcache.Options{MaxFetchSize: 1})
	blob, err := cache.OpenBlob(context.Background(), backendStore{be}, &tb.entry, tb.table)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	chunkRange := func(i int) (int64, []byte) {
		c := tb.chunks[i]
		return int64(c.UncompressedOffset), make([]byte, c.UncompressedSize)
	}
	victim := tb.chunks[3]
	inVictim := func(off int64) bool { return uint64(off) == victim.CompressedOffset }

	faults := []struct {
		name string
		hook func(p []byte, off int64) error
		want error // errors.Is target, nil for any error
	}{
		{"error", func(p []byte, off int64) error {
			if inVictim(off) {
				return errors.New("injected: 503 service unavailable")
			}
			return nil
		}, nil},
		{"corrupt", func(p []byte, off int64) error {
			if inVictim(off) {
				p[len(p)/2] ^= 0x10
			}
			return nil
		}, nil}, // lz4 may fail to decode or decode to other bytes: either way an error
		{"truncated", func(p []byte, off int64) error {
			if inVictim(off) {
				return io.ErrUnexpectedEOF
			}
			return nil
		}, io.ErrUnexpectedEOF},
	}
	for i, f := range faults {
		be.setHook(f.hook)
		off, p := chunkRange(3)
		_, err := blob.ReadAt(p, off)
		if err == nil {
			t.Fatalf("%s: read of the damaged chunk succeeded", f.name)
		}
		if f.want != nil && !errors.Is(err, f.want) {
			t.Errorf("%s: error %v, want %v", f.name, err, f.want)
		}
		t.Logf("%s: %v", f.name, err)
		// Other chunks are fine meanwhile.
		off2, q := chunkRange(i)
		if i == 3 {
			off2, q = chunkRange(7)
		}
		if _, err := blob.ReadAt(q, off2); err != nil || !bytes.Equal(q, tb.plain[off2:off2+int64(len(q))]) {
			t.Fatalf("%s: a healthy chunk failed: %v", f.name, err)
		}
	}
	// Deliberately wrong bytes that still decode: digest mismatch.
	be.setHook(func(p []byte, off int64) error {
		if inVictim(off) {
			good := make([]byte, victim.UncompressedSize)
			good[0] = 1
			enc, err := rafs.Compress(rafs.CompressLZ4Block, nil, good)
			if err != nil || len(enc) > len(p) {
				return fmt.Errorf("test setup: %v", err)
			}
			n := copy(p, enc)
			clear(p[n:])
		}
		return nil
	})
	off, p := chunkRange(3)
	if _, err := blob.ReadAt(p, off); err == nil {
		t.Fatal("decodable wrong bytes were served")
	} else {
		t.Logf("decodable wrong bytes: %v", err)
	}
	// Healed backend: the same read now works.
	be.setHook(nil)
	if _, err := blob.ReadAt(p, off); err != nil || !bytes.Equal(p, tb.plain[off:off+int64(len(p))]) {
		t.Fatalf("after the fault went away: %v", err)
	}
	if got := readAll(t, blob, blob.Size(), 1<<20); !bytes.Equal(got, tb.plain) {
		t.Fatal("full read differs")
	}
}

// TestTransientFaultRetried: a fault on the first attempt only is cured by
// the read's second attempt; the reader sees correct data.
func TestTransientFaultRetried(t *testing.T) {
	tb := makeBlob(t, rafs.CompressZstd, rafs.DigestBlake3, 4, 32<<10, 6)
	be := &memBackend{data: tb.stored}
	cache := openCache(t, t.TempDir(), nil)
	blob, err := cache.OpenBlob(context.Background(), backendStore{be}, &tb.entry, tb.table)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	var once sync.Once
	be.setHook(func(p []byte, off int64) error {
		once.Do(func() { p[0] ^= 0xFF })
		return nil
	})
	got := readAll(t, blob, blob.Size(), int(blob.Size()))
	if !bytes.Equal(got, tb.plain) {
		t.Fatal("wrong bytes")
	}
	if st := blob.Stats(); st.FetchErrors != 1 || st.BackendReads != 2 {
		t.Errorf("stats %+v, want one failed fetch and one good", st)
	}
}

// TestCacheFileDamage: a map that no longer matches (other digests, a
// damaged header, a resized data file) is not trusted.
func TestCacheFileDamage(t *testing.T) {
	tb := makeBlob(t, rafs.CompressGzip, rafs.DigestSHA256, 4, 32<<10, 8)
	dir := t.TempDir()
	fill := func(table []rafs.ChunkInfo) blobcache.Stats {
		t.Helper()
		cache := openCache(t, dir, nil)
		defer cache.Close()
		blob, err := cache.OpenBlob(context.Background(), backendStore{&memBackend{data: tb.stored}}, &tb.entry, table)
		if err != nil {
			t.Fatal(err)
		}
		defer blob.Close()
		st := blob.Stats()
		if got := readAll(t, blob, blob.Size(), 4096); !bytes.Equal(got, tb.plain) {
			t.Fatal("wrong bytes")
		}
		return st
	}
	if st := fill(tb.table); st.ReadyUnits != 0 {
		t.Fatalf("fresh cache has %d ready units", st.ReadyUnits)
	}
	if st := fill(tb.table); st.ReadyUnits != 4 {
		t.Fatalf("reopened cache has %d ready units, want 4", st.ReadyUnits)
	}
	// Same blob, a bootstrap with one digest different: start over (and
	// fail that chunk, since the digest is wrong).
	table := append([]rafs.ChunkInfo(nil), tb.table...)
	table[1].Digest[3] ^= 1
	cache := openCache(t, dir, nil)
	blob, err := cache.OpenBlob(context.Background(), backendStore{&memBackend{data: tb.stored}}, &tb.entry, table)
	if err != nil {
		t.Fatal(err)
	}
	if st := blob.Stats(); st.ReadyUnits != 0 {
		t.Errorf("other digests: %d ready units, want 0", st.ReadyUnits)
	}
	p := make([]byte, tb.chunks[1].UncompressedSize)
	if _, err := blob.ReadAt(p, int64(tb.chunks[1].UncompressedOffset)); !errors.Is(err, blobcache.ErrDigestMismatch) {
		t.Errorf("chunk with a wrong bootstrap digest: %v", err)
	}
	blob.Close()
	cache.Close()

	fill(tb.table)
	id := tb.entry.ID()
	// Damaged map header.
	mp := filepath.Join(dir, id+".map")
	b, err := os.ReadFile(mp)
	if err != nil {
		t.Fatal(err)
	}
	b[40] ^= 1
	if err := os.WriteFile(mp, b, 0o640); err != nil {
		t.Fatal(err)
	}
	if st := fill(tb.table); st.ReadyUnits != 0 {
		t.Errorf("damaged map: %d ready units, want 0", st.ReadyUnits)
	}
	// Data file of the wrong size.
	if err := os.Truncate(filepath.Join(dir, id+".data"), 4096); err != nil {
		t.Fatal(err)
	}
	if st := fill(tb.table); st.ReadyUnits != 0 {
		t.Errorf("truncated data file: %d ready units, want 0", st.ReadyUnits)
	}
	// Damaged meta file: ignored, refetched.
	mf := filepath.Join(dir, id+".meta")
	b, err = os.ReadFile(mf)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] ^= 1
	if err := os.WriteFile(mf, b, 0o640); err != nil {
		t.Fatal(err)
	}
	if st := fill(tb.table); st.ReadyUnits != 4 {
		t.Errorf("damaged meta: %d ready units, want 4 (data map still valid)", st.ReadyUnits)
	}
}

// TestLockAndLifecycle: one process per directory, one Blob per id, reads
// after Close fail, and the directory is 0750.
func TestLockAndLifecycle(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cache")
	cache := openCache(t, dir, nil)
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o750 {
		t.Errorf("cache dir mode %v, %v; want 0750", fi.Mode().Perm(), err)
	}
	if _, err := blobcache.Open(dir, nil); !errors.Is(err, blobcache.ErrLocked) {
		t.Errorf("second Open of a locked dir: %v, want ErrLocked", err)
	}
	tb := makeBlob(t, rafs.CompressZstd, rafs.DigestBlake3, 2, 16<<10, 9)
	blob, err := cache.OpenBlob(context.Background(), backendStore{&memBackend{data: tb.stored}}, &tb.entry, tb.table)
	if err != nil {
		t.Fatal(err)
	}
	// A second open shares the blob (see TestSharedOpen); closing it
	// leaves the first Handle working.
	second, err := cache.OpenBlob(context.Background(), backendStore{&memBackend{data: tb.stored}}, &tb.entry, tb.table)
	if err != nil {
		t.Fatal(err)
	}
	second.Close()
	if err := cache.Remove(tb.entry.ID()); err == nil {
		t.Error("an open blob was removed")
	}
	blob.PrefetchAll()
	if err := blob.WaitPrefetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := blob.Stats(); st.ReadyUnits != 2 {
		t.Errorf("after PrefetchAll: %+v", st)
	}
	if err := blob.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := blob.ReadAt(make([]byte, 10), 0); err == nil {
		t.Error("read after Close succeeded")
	}
	ents, err := cache.List()
	if err != nil || len(ents) != 1 || ents[0].ReadyUnits != 2 || ents[0].Units != 2 || ents[0].DiskUsage == 0 {
		t.Fatalf("List: %+v, %v", ents, err)
	}
	removed, err := cache.GC(blobcache.GCOptions{MaxSize: 1})
	if err != nil || len(removed) != 1 {
		t.Fatalf("GC: %+v, %v", removed, err)
	}
	if ents, _ := cache.List(); len(ents) != 0 {
		t.Errorf("after GC: %+v", ents)
	}
	if err := cache.Close(); err != nil {
		t.Fatal(err)
	}
	c2, err := blobcache.Open(dir, nil)
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	c2.Close()
}

// TestCloseWhileOpening: closing the cache while a blob is being opened
// neither crashes nor leaves that blob open; the open fails.
func TestCloseWhileOpening(t *testing.T) {
	cache, err := blobcache.Open(filepath.Join(t.TempDir(), "cache"), nil)
	if err != nil {
		t.Fatal(err)
	}
	tb := makeBlob(t, rafs.CompressZstd, rafs.DigestBlake3, 2, 16<<10, 11)
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	be := &memBackend{data: tb.stored, hook: func([]byte, int64) error {
		once.Do(func() { close(entered) })
		<-release
		return nil
	}}
	opened := make(chan error, 1)
	go func() {
		b, err := cache.OpenBlob(context.Background(), backendStore{be}, &tb.entry, tb.table)
		if err == nil {
			b.Close()
		}
		opened <- err
	}()
	<-entered // the open is reading the blob's chunk table
	if err := cache.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	close(release)
	if err := <-opened; err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("open during Close: %v, want a closed-cache error", err)
	}
}
