package blobcache_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/registry"
	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
)

// proxy is a reverse proxy in front of the registry that counts the body
// bytes it relays and can inject faults into blob requests whose Range
// starts at a chosen offset.
type proxy struct {
	srv      *httptestServer
	rp       *httputil.ReverseProxy
	bytes    atomic.Int64
	requests atomic.Int64

	mu     sync.Mutex
	fault  string // "", "503", "reset", "truncate", "stall", "corrupt"
	lo, hi int64  // a Range starting in [lo, hi) triggers the fault
	left   int    // faults still to inject; <0 means forever
}

type httptestServer struct {
	*http.Server
	addr string
}

func newProxy(t *testing.T, target string) *proxy {
	t.Helper()
	u, _ := url.Parse("http://" + target)
	p := &proxy{rp: httputil.NewSingleHostReverseProxy(u)}
	p.rp.ModifyResponse = func(resp *http.Response) error {
		if resp.Request.Header.Get("X-Test-Corrupt") == "1" {
			resp.Body = &corruptingBody{ReadCloser: resp.Body}
		}
		return nil
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &http.Server{Handler: p}
	go s.Serve(l)
	t.Cleanup(func() { s.Close() })
	p.srv = &httptestServer{Server: s, addr: l.Addr().String()}
	return p
}

func (p *proxy) setFault(kind string, lo, hi int64, times int) {
	p.mu.Lock()
	p.fault, p.lo, p.hi, p.left = kind, lo, hi, times
	p.mu.Unlock()
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w countingWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.n.Add(int64(n))
	return n, err
}

func (w countingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// corruptingBody flips one bit of the 1000th byte it relays.
type corruptingBody struct {
	io.ReadCloser
	pos int
}

func (c *corruptingBody) Read(b []byte) (int, error) {
	n, err := c.ReadCloser.Read(b)
	if k := 1000 - c.pos; k >= 0 && k < n {
		b[k] ^= 0x01
	}
	c.pos += n
	return n, err
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.requests.Add(1)
	p.mu.Lock()
	kind := ""
	var start int64 = -1
	fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-", &start)
	if p.fault != "" && p.left != 0 && start >= p.lo && start < p.hi {
		kind = p.fault
		if p.left > 0 {
			p.left--
		}
	}
	p.mu.Unlock()
	switch kind {
	case "503":
		http.Error(w, `{"errors":[{"code":"UNAVAILABLE"}]}`, http.StatusServiceUnavailable)
		return
	case "reset":
		if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
			if tc, ok := conn.(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
			conn.Close()
		}
		return
	case "stall":
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
		return
	case "truncate":
		// Relay the headers and half of the body, then drop the connection.
		rec := &bytes.Buffer{}
		rr := &recorder{header: http.Header{}, body: rec}
		p.rp.ServeHTTP(rr, r)
		for k, v := range rr.header {
			w.Header()[k] = v
		}
		w.WriteHeader(rr.code)
		w.Write(rec.Bytes()[:rec.Len()/2])
		w.(http.Flusher).Flush()
		if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
			conn.Close()
		}
		return
	case "corrupt":
		r.Header.Set("X-Test-Corrupt", "1")
	}
	p.rp.ServeHTTP(countingWriter{w, &p.bytes}, r)
}

type recorder struct {
	header http.Header
	body   *bytes.Buffer
	code   int
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *recorder) WriteHeader(code int)        { r.code = code }

// writeTree fills dir with a deterministic tree: many small text files and
// a few large ones, compressible but not trivially.
func writeTree(t testing.TB, dir string, seed uint64) map[string][]byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 11))
	words := strings.Fields("the quick brown fox jumps over a lazy dog while chunks of nydus blobs travel through " +
		"registries caches and block devices toward the erofs driver of a linux kernel somewhere far away")
	text := func(n int) []byte {
		var b bytes.Buffer
		for b.Len() < n {
			b.WriteString(words[rng.IntN(len(words))])
			if rng.IntN(12) == 0 {
				fmt.Fprintf(&b, " %d\n", rng.Uint64())
			} else {
				b.WriteByte(' ')
			}
		}
		return b.Bytes()[:n]
	}
	files := map[string][]byte{}
	for i := range 40 {
		files[fmt.Sprintf("small/file-%02d.txt", i)] = text(100 + rng.IntN(20000))
	}
	for i := range 6 {
		files[fmt.Sprintf("big/data-%d.bin", i)] = text(2<<20 + rng.IntN(2<<20))
	}
	for name, data := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return files
}

// registryImage builds an image with build.FromDir, pushes its blob to a
// fresh docker-registry behind a counting proxy, and returns the parsed
// bootstrap, the source files, the local blob and the proxy.
func registryImage(t *testing.T, comp rafs.Compressor) (*rafs.Image, map[string][]byte, []byte, *proxy, string) {
	t.Helper()
	addr := testregistry.Start(t)
	src, blobDir := t.TempDir(), t.TempDir()
	files := writeTree(t, src, 1)
	var boot bytes.Buffer
	opts := build.DefaultOptions(blobDir)
	opts.Compressor = comp
	res, err := build.FromDir(context.Background(), src, &boot, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Blobs) != 1 {
		t.Fatalf("build made %d blobs", len(res.Blobs))
	}
	img, err := rafs.NewImage(bytes.NewReader(boot.Bytes()), int64(boot.Len()))
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(res.Blobs[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	const repo = "rafsnbd/test"
	testregistry.PushBlob(t, addr, repo, res.Blobs[0].ID, data)
	return img, files, data, newProxy(t, addr), repo
}

// TestRegistryLazy reads one small file through a real registry: only a
// small fraction of the blob crosses the wire; then every file, checked
// against the source tree, and the whole uncompressed space, checked
// against rafs' own (cache-less) decoder of the local blob.
func TestRegistryLazy(t *testing.T) {
	img, files, blobData, px, repo := registryImage(t, rafs.CompressZstd)
	store, err := registry.New(px.srv.addr+"/"+repo, registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cache := openCache(t, t.TempDir(), nil)
	ctx := context.Background()
	blob, err := cache.OpenBlob(ctx, store, &img.Blobs[0], img.ChunkTable)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	layoutBytes := px.bytes.Load()

	const name = "small/file-07.txt"
	e, err := img.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	exts, err := img.FileExtents(e)
	if err != nil {
		t.Fatal(err)
	}
	var got []byte
	for _, x := range exts {
		p := make([]byte, x.Length)
		if _, err := blob.ReadAt(p, int64(x.BlobOffset)); err != nil {
			t.Fatal(err)
		}
		got = append(got, p...)
	}
	if !bytes.Equal(got, files[name]) {
		t.Fatalf("%s read through the registry differs from the source", name)
	}
	fileBytes := px.bytes.Load() - layoutBytes
	frac := float64(px.bytes.Load()) / float64(len(blobData))
	t.Logf("blob %d bytes stored, %d uncompressed, %d chunks; reading %s (%d bytes) fetched %d bytes for the layout + %d for the file = %.2f%% of the blob",
		len(blobData), img.Blobs[0].UncompressedSize, img.Blobs[0].ChunkCount, name, len(files[name]), layoutBytes, fileBytes, 100*frac)
	if frac > 0.2 {
		t.Errorf("one small file fetched %.1f%% of the blob", 100*frac)
	}

	// Everything, through rafs' io/fs view on top of the cache.
	fsys := img.FS([]io.ReaderAt{blob})
	for name, want := range files {
		got, err := fs.ReadFile(fsys, name)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s differs from the source", name)
		}
	}
	chunks, err := rafs.ReadBlobChunks(bytes.NewReader(blobData), &img.Blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	want := plainSpace(t, blobData, &img.Blobs[0], chunks)
	if all := readAll(t, blob, blob.Size(), 1<<20); !bytes.Equal(all, want) {
		t.Fatal("uncompressed space differs from the chunks decompressed")
	}
	st := blob.Stats()
	t.Logf("after reading everything: %d backend requests, %d stored bytes (blob %d), %d proxy requests", st.BackendReads, st.BackendBytes, len(blobData), px.requests.Load())
	if st.BackendBytes > int64(len(blobData)) {
		t.Errorf("fetched %d bytes of a %d-byte blob: something was fetched twice", st.BackendBytes, len(blobData))
	}
}

// TestRegistryFaults injects faults between the cache and a real registry
// into the requests for one chunk: transient faults are cured by retries
// and the reader gets correct bytes; persistent ones give that reader an
// error, never wrong bytes, while other chunks keep being served.
func TestRegistryFaults(t *testing.T) {
	testutil.SkipShort(t)
	img, _, blobData, px, repo := registryImage(t, rafs.CompressLZ4Block)
	chunks, err := rafs.ReadBlobChunks(bytes.NewReader(blobData), &img.Blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	ref := bytes.NewReader(plainSpace(t, blobData, &img.Blobs[0], chunks))
	if len(chunks) < 3 {
		t.Fatalf("%d chunks, want at least 3", len(chunks))
	}
	victim, other := chunks[1], chunks[2]
	read := func(blob *blobcache.Handle, c rafs.BlobChunk) error {
		p := make([]byte, c.UncompressedSize)
		if _, err := blob.ReadAt(p, int64(c.UncompressedOffset)); err != nil {
			return err
		}
		want := make([]byte, len(p))
		if _, err := ref.ReadAt(want, int64(c.UncompressedOffset)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, want) {
			t.Fatalf("WRONG BYTES served for chunk at %d", c.UncompressedOffset)
		}
		return nil
	}
	ropts := registry.Options{StallTimeout: 300 * time.Millisecond, Retries: 2, Backoff: 5 * time.Millisecond}
	for _, kind := range []string{"503", "reset", "truncate", "stall", "corrupt"} {
		for _, persistent := range []bool{false, true} {
			name := kind + "/transient"
			if persistent {
				name = kind + "/persistent"
			}
			t.Run(name, func(t *testing.T) {
				store, err := registry.New(px.srv.addr+"/"+repo, ropts)
				if err != nil {
					t.Fatal(err)
				}
				cache := openCache(t, t.TempDir(), nil)
				blob, err := cache.OpenBlob(context.Background(), store, &img.Blobs[0], img.ChunkTable)
				if err != nil {
					t.Fatal(err)
				}
				defer blob.Close()
				times := 1
				if persistent {
					times = -1
				}
				px.setFault(kind, int64(victim.CompressedOffset), int64(victim.CompressedOffset)+int64(victim.CompressedSize), times)
				defer px.setFault("", 0, 0, 0)
				err = read(blob, victim)
				switch {
				case persistent && err == nil:
					t.Fatal("read through a persistent fault succeeded")
				case !persistent && err != nil:
					t.Fatalf("transient fault not cured: %v", err)
				}
				if err != nil {
					t.Logf("reader sees: %v", err)
					// A flipped bit either breaks the lz4 stream or decodes
					// to other bytes, which the digest catches.
					if kind == "corrupt" && !errors.Is(err, blobcache.ErrDigestMismatch) && !strings.Contains(err.Error(), "decompress") {
						t.Errorf("corrupt bytes: %v, want a digest or decompression error", err)
					}
				}
				if err := read(blob, other); err != nil {
					t.Fatalf("healthy chunk during the fault: %v", err)
				}
				px.setFault("", 0, 0, 0)
				if err := read(blob, victim); err != nil {
					t.Fatalf("after the fault: %v", err)
				}
			})
		}
	}
}

// TestRegistryMissingBlobMessage: against a real registry, the backend's
// error for a blob it does not have names the blob once, in a short line.
// (blobcache and rafs each add the id again on top of it when a cache
// reads through the backend; that wrapping is theirs.)
func TestRegistryMissingBlobMessage(t *testing.T) {
	addr := testregistry.Start(t)
	testregistry.PushBlob(t, addr, "rafsnbd/test", sha256hex([]byte("present")), []byte("present"))
	store, err := registry.New(addr+"/rafsnbd/test", registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	id := sha256hex([]byte("absent"))
	be, err := store.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	_, err = be.ReadAt(context.Background(), make([]byte, 10), 0)
	if !errors.Is(err, blobcache.ErrNotFound) {
		t.Fatalf("missing blob: %v, want ErrNotFound", err)
	}
	t.Logf("%d characters: %v", len(err.Error()), err)
	if n := strings.Count(err.Error(), id); n != 1 || len(err.Error()) >= 200 {
		t.Errorf("the blob id appears %d times in %d characters: %q", n, len(err.Error()), err)
	}
}
