// Package registry is the blobcache backend for blobs stored in an OCI
// distribution registry: each read is an HTTP Range GET of
// /v2/<repository>/blobs/sha256:<blob id>, so only the bytes a reader needs
// cross the network.
//
// Authentication comes from a go-containerregistry keychain (by default
// the docker config file and credential helpers, as `docker pull` uses),
// and the bearer-token dance is go-containerregistry's transport. Requests
// go through the standard HTTP proxy environment variables (HTTP_PROXY,
// HTTPS_PROXY, NO_PROXY), so a P2P distribution proxy can sit in front of
// the registry; note that Go never proxies loopback addresses.
//
// Every request has its own timeout; failures a retry can cure (connection
// errors, resets, truncated bodies, stalls, 408/429/5xx) are retried with
// exponential backoff, resuming after the bytes already received. The
// number of requests in flight per Store is bounded.
package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/rafsnbd/rafsnbd/blobcache"
)

// Options tune a Store. The zero value is usable.
type Options struct {
	// Keychain resolves credentials; nil means authn.DefaultKeychain
	// (docker config file and credential helpers).
	Keychain authn.Keychain
	// Insecure allows plain HTTP and is needed for registries that are not
	// on loopback or private addresses (go-containerregistry already uses
	// HTTP for those).
	Insecure bool
	// Transport is the base HTTP transport; nil means a clone of
	// http.DefaultTransport, which honours the proxy environment variables
	// (http.ProxyFromEnvironment).
	Transport http.RoundTripper
	// Timeout bounds one HTTP request, body included (default 30s).
	Timeout time.Duration
	// Retries is how many times a failed request is retried (default 4;
	// negative means none).
	Retries int
	// Backoff is the first retry delay, doubled for each further retry up
	// to 5s, with up to 50% random jitter (default 200ms).
	Backoff time.Duration
	// MaxConcurrency bounds the requests in flight (default 8).
	MaxConcurrency int
}

func (o *Options) fill() {
	if o.Keychain == nil {
		o.Keychain = authn.DefaultKeychain
	}
	if o.Transport == nil {
		o.Transport = http.DefaultTransport.(*http.Transport).Clone()
	}
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	if o.Retries == 0 {
		o.Retries = 4
	} else if o.Retries < 0 {
		o.Retries = 0
	}
	if o.Backoff <= 0 {
		o.Backoff = 200 * time.Millisecond
	}
	if o.MaxConcurrency <= 0 {
		o.MaxConcurrency = 8
	}
}

const maxBackoff = 5 * time.Second

// Store is one repository of a registry; blobs are opened by blob id,
// which is the hex sha256 digest of the blob (the layer digest).
type Store struct {
	repo  name.Repository
	opts  Options
	slots chan struct{} // semaphore: requests in flight

	mu     sync.Mutex
	client *http.Client // authenticated, made on first use

	requests, retries, bytes atomic.Int64
}

var _ blobcache.Store = (*Store)(nil)

// New returns the store for repository ref ("host[:port]/path", any tag or
// digest is ignored). Nothing is contacted until a blob is opened.
func New(ref string, opts Options) (*Store, error) {
	opts.fill()
	var nameOpts []name.Option
	if opts.Insecure {
		nameOpts = append(nameOpts, name.Insecure)
	}
	repo, err := name.NewRepository(stripReference(ref), nameOpts...)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	return &Store{repo: repo, opts: opts, slots: make(chan struct{}, opts.MaxConcurrency)}, nil
}

// stripReference drops a ":tag" or "@digest" suffix, which a blob store
// does not need, so that an image reference can be given as is.
func stripReference(ref string) string {
	if i := strings.IndexByte(ref, '@'); i >= 0 {
		ref = ref[:i]
	}
	if i := strings.LastIndexByte(ref, ':'); i > strings.LastIndexByte(ref, '/') && strings.Contains(ref, "/") {
		ref = ref[:i]
	}
	return ref
}

// Repository is the repository blobs are read from.
func (s *Store) Repository() name.Repository { return s.repo }

// Stats are counters over the store's lifetime.
type Stats struct {
	Requests int64 // HTTP requests sent, retries included
	Retries  int64 // requests that were retries
	Bytes    int64 // body bytes received for blob reads
}

// Stats returns the store's counters.
func (s *Store) Stats() Stats {
	return Stats{Requests: s.requests.Load(), Retries: s.retries.Load(), Bytes: s.bytes.Load()}
}

// httpClient authenticates once (ping, token) and reuses the transport.
// A failure is not remembered, so a registry that was briefly down is
// tried again by the next call.
func (s *Store) httpClient(ctx context.Context) (*http.Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client != nil {
		return s.client, nil
	}
	reg := s.repo.Registry
	auth, err := authn.Resolve(ctx, s.opts.Keychain, reg)
	if err != nil {
		return nil, fmt.Errorf("registry: credentials for %s: %w", reg, err)
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	rt, err := transport.NewWithContext(ctx, reg, auth, s.opts.Transport, []string{s.repo.Scope(transport.PullScope)})
	if err != nil {
		return nil, fmt.Errorf("registry: %s: %w", reg, err)
	}
	s.client = &http.Client{Transport: rt}
	return s.client, nil
}

// Open returns the backend of blob sha256:blobID. It does not contact the
// registry beyond authenticating; a missing blob shows up on first read.
func (s *Store) Open(ctx context.Context, blobID string) (blobcache.Backend, error) {
	digest := blobID
	if !strings.HasPrefix(digest, "sha256:") {
		digest = "sha256:" + digest
	}
	if hex := strings.TrimPrefix(digest, "sha256:"); len(hex) != 64 || strings.Trim(hex, "0123456789abcdef") != "" {
		return nil, fmt.Errorf("registry: blob id %q is not a sha256 hex digest", blobID)
	}
	if _, err := s.httpClient(ctx); err != nil {
		return nil, err
	}
	reg := s.repo.Registry
	u := fmt.Sprintf("%s://%s/v2/%s/blobs/%s", reg.Scheme(), reg.RegistryStr(), s.repo.RepositoryStr(), digest)
	return &Blob{store: s, url: u, digest: digest, size: -1}, nil
}

// Blob reads one blob with Range requests.
type Blob struct {
	store  *Store
	url    string
	digest string

	sizeMu sync.Mutex
	size   int64 // -1 until known
}

// errRetry marks failures worth another attempt.
type errRetry struct{ err error }

func (e errRetry) Error() string { return e.err.Error() }
func (e errRetry) Unwrap() error { return e.err }

// do runs attempt with per-request timeouts, the concurrency bound and
// retries with backoff. attempt returns errRetry for retryable failures.
func (b *Blob) do(ctx context.Context, what string, attempt func(ctx context.Context, c *http.Client) error) error {
	s := b.store
	c, err := s.httpClient(ctx)
	if err != nil {
		return err
	}
	delay := s.opts.Backoff
	for try := 0; ; try++ {
		if try > 0 {
			s.retries.Add(1)
		}
		err = b.once(ctx, c, attempt)
		var re errRetry
		if err == nil || !errors.As(err, &re) || try >= s.opts.Retries || ctx.Err() != nil {
			break
		}
		sleep := delay + time.Duration(rand.Int64N(int64(delay)/2+1))
		delay = min(2*delay, maxBackoff)
		t := time.NewTimer(sleep)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("registry: %s %s: %w (after: %v)", what, b.digest, ctx.Err(), err)
		case <-t.C:
		}
	}
	if err != nil {
		return fmt.Errorf("registry: %s %s from %s: %w", what, b.digest, s.repo, err)
	}
	return nil
}

func (b *Blob) once(ctx context.Context, c *http.Client, attempt func(context.Context, *http.Client) error) error {
	s := b.store
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-s.slots }()
	s.requests.Add(1)
	actx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	err := attempt(actx, c)
	if err != nil && ctx.Err() == nil && actx.Err() != nil {
		// The request's own timeout fired (a stall), not the caller's.
		return errRetry{fmt.Errorf("request timed out after %v: %w", s.opts.Timeout, err)}
	}
	return err
}

// classify turns a transport error or a bad status into an error, marking
// the retryable ones.
func classify(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) {
		return err
	}
	// Connection refused/reset, EOF before headers, TLS hiccups, timeouts:
	// all are worth another try.
	return errRetry{err}
}

func statusError(resp *http.Response) error {
	err := transport.CheckError(resp)
	switch code := resp.StatusCode; {
	case code == http.StatusNotFound:
		return fmt.Errorf("%w: %w", blobcache.ErrNotFound, err)
	case code == http.StatusRequestTimeout || code == http.StatusTooManyRequests || code >= 500:
		return errRetry{err}
	}
	return err
}

// ReadAt reads len(p) stored bytes at off with one or more Range requests.
// It returns io.EOF when the blob ends before p is full.
func (b *Blob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("registry: negative offset %d", off)
	}
	if len(p) == 0 {
		return 0, nil
	}
	done := 0
	eof := false
	err := b.do(ctx, "read", func(ctx context.Context, c *http.Client) error {
		n, atEOF, err := b.readOnce(ctx, c, p[done:], off+int64(done))
		done += n // keep what arrived; a retry resumes after it
		eof = atEOF
		return err
	})
	if err != nil {
		return done, err
	}
	if eof && done < len(p) {
		return done, io.EOF
	}
	return done, nil
}

func (b *Blob) readOnce(ctx context.Context, c *http.Client, p []byte, off int64) (n int, eof bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.url, nil)
	if err != nil {
		return 0, false, err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+int64(len(p))-1))
	resp, err := c.Do(req)
	if err != nil {
		return 0, false, classify(err)
	}
	defer resp.Body.Close()
	body := io.Reader(resp.Body)
	want := len(p)
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, end, _, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return 0, false, err
		}
		if start != off || end < start || end-start+1 > int64(len(p)) {
			return 0, false, fmt.Errorf("asked for bytes %d-%d, server sent Content-Range %q",
				off, off+int64(len(p))-1, resp.Header.Get("Content-Range"))
		}
		if got := int(end - start + 1); got < want {
			want, eof = got, true // the blob ends inside the range
		}
	case http.StatusOK:
		// The server ignored Range: skip to off in the full body. Slow but
		// correct; registries and blob stores answer 206 in practice.
		if _, err := io.CopyN(io.Discard, body, off); err != nil {
			if errors.Is(err, io.EOF) {
				return 0, true, nil
			}
			return 0, false, classify(err)
		}
	case http.StatusRequestedRangeNotSatisfiable:
		return 0, true, nil
	default:
		return 0, false, statusError(resp)
	}
	n, err = io.ReadFull(body, p[:want])
	b.store.bytes.Add(int64(n))
	if err != nil {
		if resp.StatusCode == http.StatusOK && n > 0 && errors.Is(err, io.ErrUnexpectedEOF) && resp.ContentLength == off+int64(n) {
			return n, true, nil // whole-body answer that really ends here
		}
		// A body cut short: retry for the rest.
		return n, false, errRetry{fmt.Errorf("body ended after %d of %d bytes: %w", n, want, err)}
	}
	return n, eof, nil
}

// parseContentRange parses "bytes START-END/TOTAL" (TOTAL may be "*").
func parseContentRange(s string) (start, end, total int64, err error) {
	bad := fmt.Errorf("malformed Content-Range %q", s)
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	a, z, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	if start, err = strconv.ParseInt(a, 10, 64); err != nil {
		return 0, 0, 0, bad
	}
	if end, err = strconv.ParseInt(z, 10, 64); err != nil {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil {
			return 0, 0, 0, bad
		}
	}
	return start, end, total, nil
}

// Size is the blob's stored size, from a HEAD request (asked once).
func (b *Blob) Size(ctx context.Context) (int64, error) {
	b.sizeMu.Lock()
	defer b.sizeMu.Unlock()
	if b.size >= 0 {
		return b.size, nil
	}
	err := b.do(ctx, "size of", func(ctx context.Context, c *http.Client) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodHead, b.url, nil)
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err != nil {
			return classify(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return statusError(resp)
		}
		if resp.ContentLength < 0 {
			return fmt.Errorf("HEAD answer has no Content-Length")
		}
		b.size = resp.ContentLength
		return nil
	})
	if err != nil {
		return 0, err
	}
	return b.size, nil
}
