package blobcache_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// The crash test re-runs this test binary as a child process that reads a
// blob through the cache from many goroutines until it is killed with
// SIGKILL; the parent then checks what survived.
const crashEnv = "BLOBCACHE_CRASH_CHILD_DIR"

// crashBlobFiles writes what the child needs: the blob in blobs/, the blob
// table entry and the chunk table.
func crashBlobFiles(t *testing.T, dir string, tb *testBlob) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "blobs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "blobs", tb.entry.ID()), tb.stored, 0o644); err != nil {
		t.Fatal(err)
	}
	e := make([]byte, rafs.BlobEntrySize)
	tb.entry.Encode(e)
	table := make([]byte, len(tb.table)*rafs.ChunkInfoSize)
	for i := range tb.table {
		tb.table[i].Encode(table[i*rafs.ChunkInfoSize:])
	}
	if err := os.WriteFile(filepath.Join(dir, "entry"), e, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "table"), table, 0o644); err != nil {
		t.Fatal(err)
	}
}

func loadCrashBlob(t *testing.T, dir string) (rafs.BlobEntry, []rafs.ChunkInfo) {
	t.Helper()
	eb, err := os.ReadFile(filepath.Join(dir, "entry"))
	if err != nil {
		t.Fatal(err)
	}
	tbl, err := os.ReadFile(filepath.Join(dir, "table"))
	if err != nil {
		t.Fatal(err)
	}
	var e rafs.BlobEntry
	e.Decode(eb)
	table := make([]rafs.ChunkInfo, len(tbl)/rafs.ChunkInfoSize)
	for i := range table {
		table[i].Decode(tbl[i*rafs.ChunkInfoSize:])
	}
	return e, table
}

// slowBackend delays every read, so the child is still busy when killed.
type slowBackend struct {
	blobcache.Backend
	delay time.Duration
}

func (s slowBackend) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	time.Sleep(s.delay)
	return s.Backend.ReadAt(ctx, p, off)
}

// TestCrashChild is the child's body; it does nothing in a normal run.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashEnv)
	if dir == "" {
		t.Skip("helper process of TestCrashDuringReads")
	}
	e, table := loadCrashBlob(t, dir)
	cache, err := blobcache.Open(filepath.Join(dir, "cache"), &blobcache.Options{FlushInterval: 5 * time.Millisecond, MaxFetchSize: 128 << 10})
	if err != nil {
		t.Fatal(err)
	}
	be, err := localfs.New(filepath.Join(dir, "blobs")).Open(context.Background(), e.ID())
	if err != nil {
		t.Fatal(err)
	}
	blob, err := cache.OpenBlob(context.Background(), backendStore{slowBackend{be, 3 * time.Millisecond}}, &e, table)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("child: reading")
	// Until killed (bounded, in case the parent is gone).
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(g)))
			p := make([]byte, 256<<10)
			for ctx.Err() == nil {
				off := rng.Int64N(blob.Size())
				n := 1 + rng.IntN(len(p))
				blob.ReadAtContext(ctx, p[:n], off)
			}
		}()
	}
	wg.Wait()
}

// readyBits reads the durable ready bits of a blob's map file, as laid out
// in doc.go: 4 KiB header, then one bit per unit, MSB first.
func readyBits(t *testing.T, mapPath string, units int) []bool {
	t.Helper()
	b, err := os.ReadFile(mapPath)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 4096+(units+7)/8 || string(b[:16]) != "rafsnbd-readymap" {
		t.Fatalf("map file %s: %d bytes, magic %q", mapPath, len(b), b[:16])
	}
	out := make([]bool, units)
	for i := range out {
		out[i] = b[4096+i/8]&(0x80>>(i%8)) != 0
	}
	return out
}

// TestCrashDuringReads kills a child with SIGKILL during heavy concurrent
// reads, three times, each time checking that every unit the map calls
// ready has the right bytes in the data file; then a restart serves the
// whole blob correctly and fetches only the units that were not ready.
func TestCrashDuringReads(t *testing.T) {
	testutil.SkipShort(t)
	dir := t.TempDir()
	tb := makeBlob(t, rafs.CompressZstd, rafs.DigestBlake3, 240, 64<<10, 42)
	crashBlobFiles(t, dir, tb)
	id := tb.entry.ID()
	mapPath := filepath.Join(dir, "cache", id+".map")
	dataPath := filepath.Join(dir, "cache", id+".data")
	units := len(tb.chunks)
	prevReady := 0
	for round, target := range []int{units / 5, units / 2, 4 * units / 5} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashEnv+"="+dir)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		killed := false
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			if _, err := os.Stat(mapPath); err == nil {
				n := 0
				for _, r := range readyBits(t, mapPath, units) {
					if r {
						n++
					}
				}
				if n >= target {
					cmd.Process.Signal(syscall.SIGKILL)
					killed = true
					break
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
		err := cmd.Wait()
		if !killed {
			cmd.Process.Kill()
			t.Fatalf("round %d: child did not reach %d ready units in time: %v\n%s", round, target, err, out.Bytes())
		}
		ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
		if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("round %d: child ended with %v, not by SIGKILL\n%s", round, err, out.Bytes())
		}
		// Every unit the durable map calls ready must hold its bytes.
		ready := readyBits(t, mapPath, units)
		data, err := os.ReadFile(dataPath)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for i, r := range ready {
			if !r {
				continue
			}
			n++
			c := tb.chunks[i]
			lo, hi := c.UncompressedOffset, c.UncompressedOffset+uint64(c.UncompressedSize)
			if !bytes.Equal(data[lo:hi], tb.plain[lo:hi]) {
				t.Fatalf("round %d: unit %d is marked ready but its bytes are wrong", round, i)
			}
		}
		if n < prevReady {
			t.Fatalf("round %d: ready units went down from %d to %d", round, prevReady, n)
		}
		t.Logf("round %d: killed with %d/%d units durable and correct", round, n, units)
		prevReady = n
	}

	// Restart: everything is served right, and ready units are reused.
	ready := readyBits(t, mapPath, units)
	var missingStored int64
	for i, r := range ready {
		if !r {
			missingStored += int64(tb.chunks[i].CompressedSize)
		}
	}
	cache := openCache(t, filepath.Join(dir, "cache"), &blobcache.Options{MergeGap: -1})
	be := &memBackend{data: tb.stored}
	blob, err := cache.OpenBlob(context.Background(), backendStore{be}, &tb.entry, tb.table)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	if st := blob.Stats(); st.ReadyUnits != int64(prevReady) {
		t.Errorf("restart sees %d ready units, the map file %d", st.ReadyUnits, prevReady)
	}
	if got := readAll(t, blob, blob.Size(), 1<<20); !bytes.Equal(got, tb.plain) {
		t.Fatal("full read after the crashes differs")
	}
	st := blob.Stats()
	t.Logf("after restart: fetched %d stored bytes in %d requests for %d missing units (%d stored bytes)", st.BackendBytes, st.BackendReads, units-prevReady, missingStored)
	if st.BackendBytes != missingStored {
		t.Errorf("fetched %d stored bytes, want exactly the %d of the units that were not ready", st.BackendBytes, missingStored)
	}
}
