package registry_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/registry"
)

// fakeRegistry serves blobs of one repository the way a distribution
// registry does (GET/HEAD /v2/<repo>/blobs/sha256:<hex>, Range support),
// with a fault hook that can take over any blob request.
type fakeRegistry struct {
	srv   *httptest.Server
	repo  string
	blobs map[string][]byte
	user  string // Basic auth required when set
	pass  string

	mu     sync.Mutex
	fault  func(w http.ResponseWriter, r *http.Request, n int) bool // n counts blob requests from 1; true = handled
	ranges []string
	count  int
}

func newFakeRegistry(t *testing.T, blobs ...[]byte) (*fakeRegistry, []string) {
	f := &fakeRegistry{repo: "test/blobs", blobs: map[string][]byte{}}
	var ids []string
	for _, b := range blobs {
		s := sha256.Sum256(b)
		id := hex.EncodeToString(s[:])
		f.blobs["sha256:"+id] = b
		ids = append(ids, id)
	}
	f.srv = httptest.NewServer(f)
	t.Cleanup(f.srv.Close)
	return f, ids
}

func (f *fakeRegistry) ref() string { return strings.TrimPrefix(f.srv.URL, "http://") + "/" + f.repo }

func (f *fakeRegistry) setFault(h func(w http.ResponseWriter, r *http.Request, n int) bool) {
	f.mu.Lock()
	f.fault, f.count, f.ranges = h, 0, nil
	f.mu.Unlock()
}

func (f *fakeRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if f.user != "" {
		u, p, ok := r.BasicAuth()
		if !ok || u != f.user || p != f.pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
			return
		}
	}
	if r.URL.Path == "/v2/" {
		w.WriteHeader(http.StatusOK)
		return
	}
	prefix := "/v2/" + f.repo + "/blobs/"
	if !strings.HasPrefix(r.URL.Path, prefix) {
		http.NotFound(w, r)
		return
	}
	data, ok := f.blobs[strings.TrimPrefix(r.URL.Path, prefix)]
	if !ok {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		// As distribution answers: the detail repeats the digest.
		fmt.Fprintf(w, `{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":%q}]}`, strings.TrimPrefix(r.URL.Path, prefix))
		return
	}
	f.mu.Lock()
	f.count++
	n, fault := f.count, f.fault
	f.ranges = append(f.ranges, r.Header.Get("Range"))
	f.mu.Unlock()
	if fault != nil && fault(w, r, n) {
		return
	}
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
}

func randomBytes(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func fastOptions() registry.Options {
	return registry.Options{StallTimeout: 300 * time.Millisecond, Backoff: 5 * time.Millisecond, Retries: 3}
}

func openBlob(t *testing.T, ref, id string, opts registry.Options) (*registry.Store, blobcache.Backend) {
	t.Helper()
	s, err := registry.New(ref, opts)
	if err != nil {
		t.Fatal(err)
	}
	be, err := s.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return s, be
}

func TestReadAtAndSize(t *testing.T) {
	data := randomBytes(300000, 1)
	reg, ids := newFakeRegistry(t, data)
	store, be := openBlob(t, reg.ref()+":latest", ids[0], fastOptions())
	ctx := context.Background()
	if n, err := be.Size(ctx); err != nil || n != int64(len(data)) {
		t.Fatalf("Size = %d, %v", n, err)
	}
	p := make([]byte, 1000)
	if n, err := be.ReadAt(ctx, p, 12345); n != 1000 || err != nil || !bytes.Equal(p, data[12345:13345]) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	if reg.ranges[len(reg.ranges)-1] != "bytes=12345-13344" {
		t.Errorf("Range header %q", reg.ranges[len(reg.ranges)-1])
	}
	// Across the end: short read with io.EOF.
	n, err := be.ReadAt(ctx, p, int64(len(data))-10)
	if n != 10 || err != io.EOF || !bytes.Equal(p[:10], data[len(data)-10:]) {
		t.Errorf("read across the end = %d, %v", n, err)
	}
	if n, err := be.ReadAt(ctx, p, int64(len(data))+5); n != 0 || err != io.EOF {
		t.Errorf("read past the end = %d, %v", n, err)
	}
	if st := store.Stats(); st.Retries != 0 || st.Bytes != 1010 {
		t.Errorf("stats %+v", st)
	}
	// Missing blob.
	_, missing := openBlob(t, reg.ref(), strings.Repeat("ab", 32), fastOptions())
	if _, err := missing.ReadAt(ctx, p, 0); !errors.Is(err, blobcache.ErrNotFound) {
		t.Errorf("missing blob: %v, want ErrNotFound", err)
	}
	if _, err := store.Open(ctx, "../etc"); err == nil {
		t.Error("non-digest blob id accepted")
	}
}

func TestBasicAuth(t *testing.T) {
	data := randomBytes(5000, 2)
	reg, ids := newFakeRegistry(t, data)
	reg.user, reg.pass = "alice", "s3cret"
	opts := fastOptions()
	opts.Keychain = staticKeychain{authn.FromConfig(authn.AuthConfig{Username: "alice", Password: "s3cret"})}
	_, be := openBlob(t, reg.ref(), ids[0], opts)
	p := make([]byte, 100)
	if _, err := be.ReadAt(context.Background(), p, 10); err != nil || !bytes.Equal(p, data[10:110]) {
		t.Fatalf("authenticated read: %v", err)
	}
	opts.Keychain = staticKeychain{authn.FromConfig(authn.AuthConfig{Username: "alice", Password: "wrong"})}
	s, err := registry.New(reg.ref(), opts)
	if err != nil {
		t.Fatal(err)
	}
	be, err = s.Open(context.Background(), ids[0])
	if err == nil {
		_, err = be.ReadAt(context.Background(), p, 0)
	}
	if err == nil {
		t.Fatal("wrong password accepted")
	}
}

type staticKeychain struct{ a authn.Authenticator }

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) { return k.a, nil }

// Fault handlers. Each takes over a request and misbehaves.
func serve503(w http.ResponseWriter, _ *http.Request) {
	http.Error(w, `{"errors":[{"code":"UNAVAILABLE"}]}`, http.StatusServiceUnavailable)
}

// resetConn closes the connection with an RST, before any answer.
func resetConn(w http.ResponseWriter, _ *http.Request) {
	conn, _, err := w.(http.Hijacker).Hijack()
	if err != nil {
		return
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	conn.Close()
}

// truncate answers the range correctly but sends only half of the body.
func truncate(data []byte) func(w http.ResponseWriter, r *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		var a, z int
		if _, err := fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &a, &z); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		z = min(z, len(data)-1)
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", a, z, len(data)))
		w.Header().Set("Content-Length", fmt.Sprint(z-a+1))
		w.WriteHeader(http.StatusPartialContent)
		w.Write(data[a : a+(z-a+1)/2])
		w.(http.Flusher).Flush()
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
	}
}

// stall answers nothing until the client gives up.
func stall(w http.ResponseWriter, r *http.Request) {
	select {
	case <-r.Context().Done():
	case <-time.After(10 * time.Second):
	}
}

func TestFaultsRetried(t *testing.T) {
	data := randomBytes(200000, 3)
	reg, ids := newFakeRegistry(t, data)
	faults := map[string]func(w http.ResponseWriter, r *http.Request){
		"503":       serve503,
		"reset":     resetConn,
		"truncated": truncate(data),
		"stall":     stall,
	}
	for name, fault := range faults {
		t.Run(name, func(t *testing.T) {
			// The first two requests fail; the third works.
			reg.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
				if n <= 2 {
					fault(w, r)
					return true
				}
				return false
			})
			store, be := openBlob(t, reg.ref(), ids[0], fastOptions())
			p := make([]byte, 50000)
			start := time.Now()
			n, err := be.ReadAt(context.Background(), p, 1000)
			if err != nil || n != len(p) || !bytes.Equal(p, data[1000:51000]) {
				t.Fatalf("ReadAt = %d, %v", n, err)
			}
			st := store.Stats()
			t.Logf("%s: %v, %+v, ranges %q", name, time.Since(start).Round(time.Millisecond), st, reg.ranges)
			// net/http itself resends a GET whose reused connection was
			// reset, so a reset may cost us fewer retries than it did hits.
			if st.Retries != 2 && !(name == "reset" && st.Retries >= 1) {
				t.Errorf("%d retries, want 2", st.Retries)
			}
			if len(reg.ranges) != 3 {
				t.Errorf("registry saw %d requests, want 3", len(reg.ranges))
			}
			if name == "truncated" {
				// Each retry resumes after the bytes already received.
				want := []string{"bytes=1000-50999", "bytes=26000-50999", "bytes=38500-50999"}
				if fmt.Sprint(reg.ranges) != fmt.Sprint(want) {
					t.Errorf("ranges %q, want %q", reg.ranges, want)
				}
			}
		})
	}
}

func TestFaultsPersistent(t *testing.T) {
	data := randomBytes(100000, 4)
	reg, ids := newFakeRegistry(t, data)
	for name, fault := range map[string]func(w http.ResponseWriter, r *http.Request){
		"503": serve503, "reset": resetConn, "truncated": truncate(data), "stall": stall,
	} {
		t.Run(name, func(t *testing.T) {
			reg.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool { fault(w, r); return true })
			opts := fastOptions()
			opts.Retries = 2
			store, be := openBlob(t, reg.ref(), ids[0], opts)
			p := make([]byte, 1000)
			_, err := be.ReadAt(context.Background(), p, 0)
			if err == nil {
				t.Fatal("read through a permanently failing registry succeeded")
			}
			if st := store.Stats(); st.Requests != 3 {
				t.Errorf("%d requests, want 3 (1 + 2 retries)", st.Requests)
			}
			t.Logf("%s: %v", name, err)
		})
	}
	// A 4xx other than 408/429 is not retried.
	reg.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		http.Error(w, `{"errors":[{"code":"DENIED"}]}`, http.StatusForbidden)
		return true
	})
	store, be := openBlob(t, reg.ref(), ids[0], fastOptions())
	if _, err := be.ReadAt(context.Background(), make([]byte, 10), 0); err == nil {
		t.Fatal("403 read succeeded")
	}
	if st := store.Stats(); st.Requests != 1 {
		t.Errorf("403 was retried: %d requests", st.Requests)
	}
}

// TestConcurrencyBound: no more than MaxConcurrency requests in flight.
func TestConcurrencyBound(t *testing.T) {
	data := randomBytes(100000, 5)
	reg, ids := newFakeRegistry(t, data)
	var inflight, peak atomic.Int64
	reg.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
		cur := inflight.Add(1)
		defer inflight.Add(-1)
		for {
			old := peak.Load()
			if cur <= old || peak.CompareAndSwap(old, cur) {
				break
			}
		}
		time.Sleep(20 * time.Millisecond)
		return false
	})
	opts := fastOptions()
	opts.MaxConcurrency = 3
	_, be := openBlob(t, reg.ref(), ids[0], opts)
	var wg sync.WaitGroup
	for i := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 100)
			if _, err := be.ReadAt(context.Background(), p, int64(i*1000)); err != nil || !bytes.Equal(p, data[i*1000:i*1000+100]) {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if p := peak.Load(); p > 3 || p < 2 {
		t.Errorf("peak concurrency %d, want 3", p)
	}
}

// TestCancel: the caller's context stops a read at once, not after retries.
func TestCancel(t *testing.T) {
	data := randomBytes(1000, 6)
	reg, ids := newFakeRegistry(t, data)
	reg.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool { stall(w, r); return true })
	opts := fastOptions()
	opts.StallTimeout = 10 * time.Second
	_, be := openBlob(t, reg.ref(), ids[0], opts)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := be.ReadAt(ctx, make([]byte, 10), 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("cancelled read: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("cancelled read took %v", d)
	}
}

// TestForwardProxy: with a proxy in the transport (as HTTP_PROXY sets it
// up), every request, ping included, goes through the proxy, which is how
// a P2P distribution proxy sits in front of a registry.
func TestForwardProxy(t *testing.T) {
	data := randomBytes(70000, 7)
	reg, ids := newFakeRegistry(t, data)
	target, _ := url.Parse(reg.srv.URL)
	var relayed atomic.Int64
	rp := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		if r.In.URL.Host != "blobs.invalid" {
			t.Errorf("proxy asked for host %q", r.In.URL.Host)
		}
		r.SetURL(target)
	}}
	px := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodConnect { // no TLS here: refuse, so the client falls back to http
			http.Error(w, "no CONNECT", http.StatusBadGateway)
			return
		}
		relayed.Add(1)
		rp.ServeHTTP(w, r)
	}))
	defer px.Close()
	pxURL, _ := url.Parse(px.URL)
	opts := fastOptions()
	opts.Insecure = true
	opts.Transport = &http.Transport{Proxy: http.ProxyURL(pxURL)}
	_, be := openBlob(t, "blobs.invalid/"+reg.repo, ids[0], opts)
	p := make([]byte, 5000)
	if _, err := be.ReadAt(context.Background(), p, 60000); err != nil || !bytes.Equal(p, data[60000:65000]) {
		t.Fatalf("read through the proxy: %v", err)
	}
	if n := relayed.Load(); n < 2 {
		t.Errorf("proxy relayed %d requests, want the ping and the read", n)
	}
}

// TestMissingBlobMessage: a missing blob's error names the blob once, with
// what the registry said, in a short line (was 569 characters naming it
// three times, five through the cache).
func TestMissingBlobMessage(t *testing.T) {
	reg, _ := newFakeRegistry(t, randomBytes(100, 8))
	id := strings.Repeat("ab", 32)
	_, be := openBlob(t, reg.ref(), id, fastOptions())
	for _, op := range []func() error{
		func() error { _, err := be.ReadAt(context.Background(), make([]byte, 10), 0); return err },
		func() error { _, err := be.Size(context.Background()); return err },
	} {
		err := op()
		if !errors.Is(err, blobcache.ErrNotFound) {
			t.Fatalf("missing blob: %v, want ErrNotFound", err)
		}
		checkBlobMessage(t, err, id)
		if !strings.HasPrefix(err.Error(), "registry: "+reg.ref()+"@sha256:"+id+": HTTP 404 Not Found") {
			t.Errorf("missing blob: %q", err)
		}
	}
}

// checkBlobMessage wants the blob id exactly once in a message under 200
// characters.
func checkBlobMessage(t *testing.T, err error, id string) {
	t.Helper()
	t.Logf("%d characters: %v", len(err.Error()), err)
	if n := strings.Count(err.Error(), id); n != 1 {
		t.Errorf("the blob id appears %d times in %q", n, err)
	}
	if len(err.Error()) >= 200 {
		t.Errorf("%d characters: %q", len(err.Error()), err)
	}
}
