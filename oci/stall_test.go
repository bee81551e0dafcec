package oci

import (
	"context"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
)

// stallingRegistry puts a loopback proxy in front of a registry. While
// stall is set, the body of a blob of more than 1 MiB stops after 64 KiB,
// and requests for which hang says so never get their headers; both wait
// until the client gives up (or the test ends).
func stallingRegistry(t *testing.T, registry string, stall *atomic.Bool, hang func(*http.Request) bool) string {
	t.Helper()
	done := make(chan struct{})
	target, _ := url.Parse("http://" + registry)
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = -1 // pass on the bytes before the stall at once
	proxy.ModifyResponse = func(resp *http.Response) error {
		if stall.Load() && strings.Contains(resp.Request.URL.Path, "/blobs/") && resp.ContentLength > 1<<20 {
			resp.Body = &stallingBody{rc: resp.Body, left: 64 << 10, ctx: resp.Request.Context(), done: done}
		}
		return nil
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if stall.Load() && hang(r) {
			select {
			case <-r.Context().Done():
			case <-done:
			}
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(func() { close(done); srv.Close() })
	return strings.TrimPrefix(srv.URL, "http://")
}

type stallingBody struct {
	rc   io.ReadCloser
	left int
	ctx  context.Context
	done chan struct{}
}

func (b *stallingBody) Read(p []byte) (int, error) {
	if b.left == 0 {
		select {
		case <-b.ctx.Done():
			return 0, b.ctx.Err()
		case <-b.done:
			return 0, io.ErrUnexpectedEOF
		}
	}
	n, err := b.rc.Read(p[:min(len(p), b.left)])
	b.left -= n
	return n, err
}

func (b *stallingBody) Close() error { return b.rc.Close() }

// TestHostileStallingRegistry: a registry that goes quiet in the middle of
// a layer, or before a manifest's headers, fails the conversion within the
// stall timeout with an error saying so, leaves nothing that counts as
// done, and the next run through a healthy registry completes.
func TestHostileStallingRegistry(t *testing.T) {
	reg := testregistry.Start(t)
	data := make([]byte, 3<<20)
	rng := rand.New(rand.NewPCG(3, 3))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	img := newImage(t, newLayer(t, makeTar(t, withSize(tFile("big", ""), data), tFile("small", "small")), "gzip"))
	pushImage(t, reg+"/stall/img:v1", img)
	pushImage(t, reg+"/stall/img:hang", img)

	var stall atomic.Bool
	stall.Store(true)
	proxy := stallingRegistry(t, reg, &stall, func(r *http.Request) bool { return strings.HasSuffix(r.URL.Path, "/manifests/hang") })
	deaf := stallingRegistry(t, reg, &stall, func(r *http.Request) bool { return r.URL.Path == "/v2/" }) // the ping
	opts := Options{Insecure: true, StallTimeout: 500 * time.Millisecond}

	// Each stall is retried (regclient's default 4 retries with backoff)
	// before the conversion gives up: the cases wait at the same time
	// (goroutines, not t.Parallel, which -parallel would bound by the CPUs).
	var wg sync.WaitGroup
	for _, c := range []struct{ name, ref, want string }{
		{"body", proxy + "/stall/img:v1", "the registry sent nothing for 500ms"},
		{"headers", proxy + "/stall/img:hang", "the registry sent nothing for 500ms"},
		{"ping", deaf + "/stall/img:v1", "no answer from " + deaf + " within 500ms"},
	} {
		wg.Go(func() {
			t.Run(c.name, func(t *testing.T) {
				opts := opts
				opts.CacheDir = filepath.Join(t.TempDir(), "cache")
				start := time.Now()
				expectError(t, c.ref, opts, c.want, "gave up after 5 tries")
				if took := time.Since(start); took > 20*time.Second {
					t.Errorf("%s: the stall took %s to detect", c.ref, took)
				}
				checkNothingDone(t, opts.CacheDir)
			})
		})
	}
	wg.Wait()

	stall.Store(false)
	opts.CacheDir = filepath.Join(t.TempDir(), "cache")
	if _, err := Convert(context.Background(), proxy+"/stall/img:v1", opts); err != nil {
		t.Fatalf("convert after the registry recovered: %v", err)
	}
}
