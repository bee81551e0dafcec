package regclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// fake is a registry of one repository ("app") with scripted faults.
type fake struct {
	srv   *httptest.Server
	blob  []byte
	tags  []string
	fault func(w http.ResponseWriter, r *http.Request, n int) bool // n counts non-ping requests from 1

	mu     sync.Mutex
	n      int
	ranges []string
}

const blobDigest = "sha256:" + "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12"

func newFake(t *testing.T) *fake {
	f := &fake{blob: bytes.Repeat([]byte("0123456789abcdef"), 1<<14), tags: []string{"v2", "v1", "latest"}}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		f.mu.Lock()
		f.n++
		n := f.n
		f.ranges = append(f.ranges, r.Header.Get("Range"))
		f.mu.Unlock()
		if f.fault != nil && f.fault(w, r, n) {
			return
		}
		switch r.URL.Path {
		case "/v2/app/blobs/" + blobDigest:
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(f.blob))
		case "/v2/app/manifests/v1":
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json; charset=utf-8")
			io.WriteString(w, `{"schemaVersion":2}`)
		case "/v2/app/tags/list":
			fmt.Fprintf(w, `{"name":"app","tags":["%s"]}`, strings.Join(f.tags, `","`))
		default:
			// As distribution answers, detail included.
			w.WriteHeader(http.StatusNotFound)
			code := "MANIFEST_UNKNOWN"
			if strings.Contains(r.URL.Path, "/blobs/") {
				code = "BLOB_UNKNOWN"
			}
			fmt.Fprintf(w, `{"errors":[{"code":%q,"message":"%s unknown to registry","detail":%q}]}`,
				code, strings.ToLower(strings.TrimSuffix(code, "_UNKNOWN")), r.URL.Path)
		}
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fake) client(t *testing.T, opts Options) *Client {
	t.Helper()
	repo, err := ParseRepository(strings.TrimPrefix(f.srv.URL, "http://")+"/app", true)
	if err != nil {
		t.Fatal(err)
	}
	if opts.Backoff == 0 {
		opts.Backoff = time.Millisecond
	}
	if opts.StallTimeout == 0 {
		opts.StallTimeout = 300 * time.Millisecond
	}
	return New(repo, opts)
}

func TestParseReference(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"docker://example.com/app:v1", "example.com/app:v1"},
		{"docker://alpine", "index.docker.io/library/alpine:latest"},
		{"localhost:5000/app", "localhost:5000/app:latest"},
		{"dir:5000/app", "dir:5000/app:latest"}, // a host named dir, not skopeo's dir: transport
	} {
		r, err := ParseReference(c.in, false)
		if err != nil || r.Name() != c.want {
			t.Errorf("ParseReference(%q) = %v, %v; want %s", c.in, r, err, c.want)
		}
	}
	for _, c := range []struct{ in, want string }{
		{"oci-archive:/tmp/x.tar", "oci-archive: reference"},
		{"docker-archive:x.tar:app:v1", "docker-archive: reference"},
		{"containers-storage:app", "containers-storage: reference"},
		{"docker://Bad/Name", `image reference "docker://Bad/Name": could not parse`},
	} {
		_, err := ParseReference(c.in, false)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseReference(%q) = %v, want an error containing %q", c.in, err, c.want)
			continue
		}
		if n := strings.Count(err.Error(), c.in); n != 1 {
			t.Errorf("%q: the reference appears %d times in %q", c.in, n, err)
		}
	}
	if r, err := ParseRepository("docker://example.com/app@sha256:"+strings.Repeat("0", 64), false); err != nil || r.String() != "example.com/app" {
		t.Errorf("ParseRepository = %v, %v", r, err)
	}
}

// TestMissingTag: a 404 for a tag lists the tags there are; the registry's
// own words (a Go map in go-containerregistry's message) do not show.
func TestMissingTag(t *testing.T) {
	f := newFake(t)
	c := f.client(t, Options{})
	ctx := context.Background()
	raw, mt, err := c.Manifest(ctx, "v1", "", 1<<20)
	if err != nil || string(raw) != `{"schemaVersion":2}` || mt != "application/vnd.oci.image.manifest.v1+json" {
		t.Fatalf("Manifest(v1) = %q, %q, %v", raw, mt, err)
	}
	_, _, err = c.Manifest(ctx, "nope", "", 1<<20)
	if want := "no such tag (the repository has: latest, v1, v2)"; err == nil || err.Error() != want {
		t.Errorf("missing tag: %v, want %q", err, want)
	}
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("missing tag: %v does not wrap ErrNotFound", err)
	}
	f.tags = nil
	for i := range 14 {
		f.tags = append(f.tags, fmt.Sprintf("t%02d", i))
	}
	_, _, err = c.Manifest(ctx, "nope", "", 1<<20)
	if want := "no such tag (the repository has: t00, t01, t02, t03, t04, t05, t06, t07, t08, t09 and 4 more)"; err == nil || err.Error() != want {
		t.Errorf("missing tag of many: %v, want %q", err, want)
	}
	// No tag list: what the registry said, without its detail.
	f.fault = func(w http.ResponseWriter, r *http.Request, _ int) bool {
		if strings.HasSuffix(r.URL.Path, "/tags/list") {
			http.Error(w, `{"errors":[{"code":"DENIED","message":"no listing"}]}`, http.StatusForbidden)
			return true
		}
		return false
	}
	_, _, err = c.Manifest(ctx, "nope", "", 1<<20)
	if want := "no such tag: HTTP 404 Not Found (MANIFEST_UNKNOWN: manifest unknown to registry)"; err == nil || err.Error() != want {
		t.Errorf("missing tag, no listing: %v, want %q", err, want)
	}
}

// TestMissingBlobMessage: the client's error leaves the digest and the URL
// to the caller, and keeps the registry's code and message.
func TestMissingBlobMessage(t *testing.T) {
	f := newFake(t)
	c := f.client(t, Options{})
	missing := "sha256:" + strings.Repeat("cd", 32)
	_, _, err := c.ReadBlobAt(context.Background(), missing, make([]byte, 10), 0)
	if want := "HTTP 404 Not Found (BLOB_UNKNOWN: blob unknown to registry)"; err == nil || err.Error() != want {
		t.Errorf("missing blob: %v, want %q", err, want)
	}
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("%v does not wrap ErrNotFound", err)
	}
	_, err = c.Blob(context.Background(), missing)
	if err == nil || strings.Contains(err.Error(), "cdcd") || strings.Contains(err.Error(), "http://") {
		t.Errorf("missing blob stream: %v", err)
	}
	if st := c.Stats(); st.Retries != 0 {
		t.Errorf("a 404 was retried: %+v", st)
	}
}

// TestRetry5xx: 503s and resets are retried with backoff, a bounded
// number of times; a 403 is not.
func TestRetry5xx(t *testing.T) {
	f := newFake(t)
	f.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if n <= 2 {
			http.Error(w, `{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}`, http.StatusServiceUnavailable)
			return true
		}
		return false
	}
	c := f.client(t, Options{})
	if _, _, err := c.Manifest(context.Background(), "v1", "", 1<<20); err != nil {
		t.Fatalf("Manifest after two 503s: %v", err)
	}
	if st := c.Stats(); st.Requests != 3 || st.Retries != 2 {
		t.Errorf("stats %+v, want 3 requests, 2 retries", st)
	}

	f.mu.Lock()
	f.n = 0
	f.mu.Unlock()
	f.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		http.Error(w, `{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}`, http.StatusServiceUnavailable)
		return true
	}
	c = f.client(t, Options{Retries: 2})
	_, _, err := c.Manifest(context.Background(), "v1", "", 1<<20)
	if want := "HTTP 503 Service Unavailable (UNAVAILABLE: try later) (gave up after 3 tries)"; err == nil || err.Error() != want {
		t.Errorf("persistent 503: %v, want %q", err, want)
	}

	f.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		http.Error(w, `{"errors":[{"code":"DENIED"}]}`, http.StatusForbidden)
		return true
	}
	c = f.client(t, Options{})
	if _, _, err := c.Manifest(context.Background(), "v1", "", 1<<20); err == nil || c.Stats().Requests != 1 {
		t.Errorf("403: %v after %d requests, want a failure after 1", err, c.Stats().Requests)
	}
}

// TestStreamResume: a layer body cut short is resumed with a Range request
// after the bytes delivered; a server that ignores Range is skipped ahead.
func TestStreamResume(t *testing.T) {
	for _, ignoreRange := range []bool{false, true} {
		t.Run(fmt.Sprint("ignoreRange=", ignoreRange), func(t *testing.T) {
			f := newFake(t)
			f.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
				if ignoreRange {
					r.Header.Del("Range")
				}
				if n > 2 {
					return false
				}
				// Headers for the whole rest, then a third of it, then the
				// connection drops.
				var off int
				fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-", &off)
				rest := f.blob[off:]
				w.Header().Set("Content-Length", fmt.Sprint(len(rest)))
				if off > 0 {
					w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, len(f.blob)-1, len(f.blob)))
					w.WriteHeader(http.StatusPartialContent)
				}
				w.Write(rest[:len(rest)/3])
				w.(http.Flusher).Flush()
				if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
					conn.Close()
				}
				return true
			}
			c := f.client(t, Options{})
			rc, err := c.Blob(context.Background(), blobDigest)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(rc)
			rc.Close()
			if err != nil || !bytes.Equal(got, f.blob) {
				t.Fatalf("read %d of %d bytes (equal %v): %v", len(got), len(f.blob), bytes.Equal(got, f.blob), err)
			}
			third := len(f.blob) / 3
			want := fmt.Sprintf("[ bytes=%d- bytes=%d-]", third, third+(len(f.blob)-third)/3)
			if ignoreRange { // the second answer starts at 0 again and brings nothing new
				want = fmt.Sprintf("[ bytes=%d- bytes=%d-]", third, third)
			}
			if fmt.Sprint(f.ranges) != want {
				t.Errorf("ranges %q, want %s", f.ranges, want)
			}
		})
	}
}

// TestStreamStall: a body that goes quiet fails, naming the stall, once
// the retries are spent; only waiting counts (a slow reader does not).
func TestStreamStall(t *testing.T) {
	f := newFake(t)
	release := make(chan struct{})
	defer close(release)
	f.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		w.Header().Set("Content-Length", fmt.Sprint(len(f.blob)))
		w.Write(f.blob[:1000])
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-release:
		}
		return true
	}
	c := f.client(t, Options{StallTimeout: 100 * time.Millisecond, Retries: 1})
	rc, err := c.Blob(context.Background(), blobDigest)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	time.Sleep(300 * time.Millisecond) // the reader is slow: does not count
	_, err = io.ReadAll(rc)
	if want := "the registry sent nothing for 100ms (gave up after 2 tries)"; err == nil || err.Error() != want {
		t.Errorf("stalled body: %v, want %q", err, want)
	}
	if !errors.Is(err, ErrStalled) {
		t.Errorf("%v does not wrap ErrStalled", err)
	}
}

// TestCancelWhileWaiting: the caller's context ends a request at once,
// stall timer and retries notwithstanding, and is what the error wraps.
func TestCancelWhileWaiting(t *testing.T) {
	f := newFake(t)
	f.fault = func(w http.ResponseWriter, r *http.Request, n int) bool { <-r.Context().Done(); return true }
	c := f.client(t, Options{StallTimeout: 10 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, _, err := c.Manifest(ctx, "v1", "", 1<<20); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("cancelled: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("cancelled request took %v", d)
	}
	if st := c.Stats(); st.Retries != 0 {
		t.Errorf("a cancelled request was retried: %+v", st)
	}
}

// TestHostileErrorBody: a huge or binary error body does not end up in the
// message.
func TestHostileErrorBody(t *testing.T) {
	f := newFake(t)
	f.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		w.WriteHeader(http.StatusForbidden)
		fmt.Fprintf(w, `{"errors":[{"code":"DENIED","message":"%s\u001b[31m"},{"code":"A"},{"code":"B"},{"code":"C"},{"code":"D"}]}`, strings.Repeat("x", 5000))
		return true
	}
	c := f.client(t, Options{})
	_, _, err := c.Manifest(context.Background(), "v1", "", 1<<20)
	if err == nil || len(err.Error()) > 250 || strings.ContainsRune(err.Error(), 0x1b) || !strings.Contains(err.Error(), "DENIED") {
		t.Errorf("hostile error body gave %q", err)
	}
}
