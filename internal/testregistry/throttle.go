package testregistry

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Proxy is a loopback HTTP proxy in front of a registry that counts the
// blob body bytes it passes and can slow them down, so that a test can
// make a download take a predictable time (and kill a process while it
// is in the middle of one) and see what a restart fetches again.
type Proxy struct {
	// Addr is host:port of the proxy: use it in place of the registry's.
	Addr  string
	rate  atomic.Int64 // blob body bytes per second; 0: unthrottled
	bytes atomic.Int64
}

// Throttle starts a Proxy for registry (host:port) until the test ends,
// sending blob bodies at about bytesPerSec (0: as fast as they come).
func Throttle(t testing.TB, registry string, bytesPerSec int64) *Proxy {
	t.Helper()
	target, err := url.Parse("http://" + registry)
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{}
	p.rate.Store(bytesPerSec)
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.ModifyResponse = func(resp *http.Response) error {
		if strings.Contains(resp.Request.URL.Path, "/blobs/") {
			resp.Body = &proxyBody{rc: resp.Body, p: p}
		}
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	p.Addr = strings.TrimPrefix(srv.URL, "http://")
	return p
}

// SetRate changes the rate of blob bodies (0: unthrottled), for reads
// from now on.
func (p *Proxy) SetRate(bytesPerSec int64) { p.rate.Store(bytesPerSec) }

// BlobBytes is the blob body bytes passed so far.
func (p *Proxy) BlobBytes() int64 { return p.bytes.Load() }

// ResetBlobBytes sets the count back to zero and returns what it was.
func (p *Proxy) ResetBlobBytes() int64 { return p.bytes.Swap(0) }

type proxyBody struct {
	rc io.ReadCloser
	p  *Proxy
}

func (b *proxyBody) Read(buf []byte) (int, error) {
	const piece = 32 << 10 // small reads keep the rate smooth
	rate := b.p.rate.Load()
	if rate > 0 && len(buf) > piece {
		buf = buf[:piece]
	}
	n, err := b.rc.Read(buf)
	b.p.bytes.Add(int64(n))
	if rate > 0 && n > 0 {
		time.Sleep(time.Duration(n) * time.Second / time.Duration(rate))
	}
	return n, err
}

func (b *proxyBody) Close() error { return b.rc.Close() }
