// Package regclient is rafsnbd's one client for OCI distribution
// registries. Image conversion (package oci) pulls manifests, configs and
// layers with it; the lazy blob backend (blobcache/registry) reads blob
// ranges with it. Both therefore share one reference syntax, one
// authentication path (go-containerregistry's keychain and transport:
// ping, then Basic or the bearer-token exchange) and one model for waiting
// and retrying.
//
// It is internal because its API follows those two callers and changes
// with them; library users set its knobs through oci.Options and
// registry.Options.
//
// Waiting. Only time spent waiting on the registry counts: a request fails
// once it has waited StallTimeout for its response headers or for the next
// bytes of its body; time the caller spends on what arrived does not
// count. The ping and the token exchange are bounded by the same timeout.
// The errors say so: "the registry sent nothing for 1m0s", "no answer from
// HOST within 1m0s". A silent TCP connection would otherwise hold a
// conversion or a block-device read for ever.
//
// Retrying. Every request is an idempotent GET or HEAD. Failures a new
// request can cure (connection refused or reset, a body cut short, a
// stall, 408, 429 and 5xx answers) are retried up to Retries times with
// exponential backoff and jitter; a body read resumes with a Range request
// after the bytes already received. Other answers (401, 403, 404, ...)
// fail at once.
//
// Errors name what the registry said, never the request URL: the caller
// names the object it asked for (repository, tag, blob digest) once.
package regclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Defaults for the zero Options fields.
const (
	DefaultStallTimeout   = time.Minute
	DefaultRetries        = 4
	DefaultBackoff        = 200 * time.Millisecond
	DefaultMaxConcurrency = 8
	maxBackoff            = 5 * time.Second
)

// Options tune a Client. The zero value is usable.
type Options struct {
	// Insecure allows plain HTTP to any registry (go-containerregistry
	// already uses it for localhost and 127.0.0.1 when HTTPS fails).
	Insecure bool
	// Keychain resolves credentials (nil: authn.DefaultKeychain, the
	// docker config file and credential helpers).
	Keychain authn.Keychain
	// Transport is the base HTTP transport (nil: a clone of
	// remote.DefaultTransport, which honours HTTP_PROXY, HTTPS_PROXY and
	// NO_PROXY, so a P2P distribution proxy can sit in front of the
	// registry; Go never proxies loopback addresses).
	Transport http.RoundTripper
	// StallTimeout fails a request that waits this long for the registry
	// (0: DefaultStallTimeout; negative: wait for ever).
	StallTimeout time.Duration
	// Retries is how many times a failed request is retried
	// (0: DefaultRetries; negative: none).
	Retries int
	// Backoff is the first retry delay, doubled for each further retry up
	// to 5s, plus up to 50% jitter (0: DefaultBackoff).
	Backoff time.Duration
	// MaxConcurrency bounds the requests in flight; an open blob stream
	// holds one slot until it is closed (0: DefaultMaxConcurrency).
	MaxConcurrency int
}

func (o *Options) fill() {
	if o.Keychain == nil {
		o.Keychain = authn.DefaultKeychain
	}
	if o.Transport == nil {
		if t, ok := remote.DefaultTransport.(*http.Transport); ok {
			t = t.Clone()
			t.MaxIdleConnsPerHost = max(t.MaxIdleConnsPerHost, DefaultMaxConcurrency)
			o.Transport = t
		} else {
			o.Transport = remote.DefaultTransport
		}
	}
	switch {
	case o.StallTimeout == 0:
		o.StallTimeout = DefaultStallTimeout
	case o.StallTimeout < 0:
		o.StallTimeout = 0
	}
	switch {
	case o.Retries == 0:
		o.Retries = DefaultRetries
	case o.Retries < 0:
		o.Retries = 0
	}
	if o.Backoff <= 0 {
		o.Backoff = DefaultBackoff
	}
	if o.MaxConcurrency <= 0 {
		o.MaxConcurrency = DefaultMaxConcurrency
	}
}

// Client talks to one repository of a registry. It is safe for concurrent
// use. Nothing is contacted until the first request, which authenticates;
// a failed authentication is not remembered, so a registry that was
// briefly down is tried again by the next request.
type Client struct {
	repo  name.Repository
	opts  Options
	slots chan struct{} // semaphore: requests in flight

	authLock chan struct{} // held while authenticating; a lock that honours contexts
	hc       atomic.Pointer[http.Client]

	requests, retries, bytes atomic.Int64
}

// New returns a client of repo.
func New(repo name.Repository, opts Options) *Client {
	opts.fill()
	return &Client{repo: repo, opts: opts, slots: make(chan struct{}, opts.MaxConcurrency), authLock: make(chan struct{}, 1)}
}

// Repository is the repository the client reads.
func (c *Client) Repository() name.Repository { return c.repo }

// Stats are counters over a client's lifetime.
type Stats struct {
	Requests int64 // HTTP requests sent for manifests and blobs, retries included
	Retries  int64 // requests that were retries
	Bytes    int64 // blob body bytes received
}

// Stats returns the client's counters.
func (c *Client) Stats() Stats {
	return Stats{Requests: c.requests.Load(), Retries: c.retries.Load(), Bytes: c.bytes.Load()}
}

// httpClient authenticates once (ping, then the token exchange when the
// registry wants one) and reuses the transport.
func (c *Client) httpClient(ctx context.Context) (*http.Client, error) {
	if hc := c.hc.Load(); hc != nil {
		return hc, nil
	}
	select {
	case c.authLock <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-c.authLock }()
	if hc := c.hc.Load(); hc != nil {
		return hc, nil
	}
	reg := c.repo.Registry
	auth, err := authn.Resolve(ctx, c.opts.Keychain, reg)
	if err != nil {
		return nil, fmt.Errorf("credentials for %s: %w", reg, err)
	}
	var rt http.RoundTripper
	r := c.retrier()
	for {
		rt, err = c.handshake(ctx, auth)
		if again, gerr := r.again(ctx, err); !again {
			err = gerr
			break
		}
	}
	if err != nil {
		return nil, err
	}
	hc := &http.Client{Transport: rt}
	c.hc.Store(hc)
	return hc, nil
}

// handshake runs one ping and token exchange, bounded by the stall timeout.
func (c *Client) handshake(ctx context.Context, auth authn.Authenticator) (http.RoundTripper, error) {
	reg := c.repo.Registry
	hctx := ctx
	if c.opts.StallTimeout > 0 {
		var cancel context.CancelFunc
		hctx, cancel = context.WithTimeoutCause(ctx, c.opts.StallTimeout,
			&stallError{fmt.Sprintf("no answer from %s within %s", reg, c.opts.StallTimeout)})
		defer cancel()
	}
	rt, err := transport.NewWithContext(hctx, reg, auth, c.opts.Transport, []string{c.repo.Scope(transport.PullScope)})
	if err == nil {
		return rt, nil
	}
	if ctx.Err() != nil {
		return nil, err
	}
	var se *stallError
	if cause := context.Cause(hctx); errors.As(cause, &se) {
		return nil, retryErr{se}
	}
	var te *transport.Error
	if errors.As(err, &te) {
		if retryableStatus(te.StatusCode) {
			return nil, retryErr{err}
		}
		return nil, err
	}
	return nil, classify(ctx, err)
}

// ErrStalled is wrapped by the error of a request that waited
// StallTimeout for the registry.
var ErrStalled = errors.New("the registry stalled")

type stallError struct{ msg string }

func (e *stallError) Error() string        { return e.msg }
func (e *stallError) Is(target error) bool { return target == ErrStalled }

// retryErr marks a failure a new request may cure. It is invisible in
// messages.
type retryErr struct{ err error }

func (e retryErr) Error() string { return e.err.Error() }
func (e retryErr) Unwrap() error { return e.err }

func retryableStatus(code int) bool {
	return code == http.StatusRequestTimeout || code == http.StatusTooManyRequests || code >= 500
}

// classify marks a transport error (no answer) retryable unless the caller
// gave up or retrying cannot help. It drops *url.Error's "Get URL:" part,
// which would repeat what the caller names.
func classify(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	if ctx.Err() != nil {
		return err
	}
	var cv *tls.CertificateVerificationError
	if errors.As(err, &cv) {
		return err
	}
	// Connection refused or reset, EOF before the headers, TLS hiccups,
	// stalls: all are worth another try.
	return retryErr{err}
}

// retrier counts the retries of one operation and waits the backoff.
type retrier struct {
	c     *Client
	tries int
	delay time.Duration
}

func (c *Client) retrier() *retrier { return &retrier{c: c, delay: c.opts.Backoff} }

// again reports whether err is worth another try, after waiting the
// backoff. When it is not, it returns the error to give the caller: nil,
// err as is, or err saying how many tries it took.
func (r *retrier) again(ctx context.Context, err error) (bool, error) {
	var re retryErr
	if err == nil || !errors.As(err, &re) {
		return false, err
	}
	if cerr := ctx.Err(); cerr != nil {
		return false, fmt.Errorf("%w (after: %v)", cerr, err)
	}
	if r.tries >= r.c.opts.Retries {
		if r.tries > 0 {
			err = fmt.Errorf("%w (gave up after %d tries)", err, r.tries+1)
		}
		return false, err
	}
	r.tries++
	r.c.retries.Add(1)
	sleep := r.delay + time.Duration(rand.Int64N(int64(r.delay)/2+1))
	r.delay = min(2*r.delay, maxBackoff)
	t := time.NewTimer(sleep)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false, fmt.Errorf("%w (while waiting to retry after: %v)", ctx.Err(), err)
	case <-t.C:
	}
	return true, nil
}

// slot waits for a free request slot; release gives it back.
func (c *Client) slot(ctx context.Context) (release func(), err error) {
	select {
	case c.slots <- struct{}{}:
		return func() { <-c.slots }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (c *Client) url(kind, id string) string {
	reg := c.repo.Registry
	return fmt.Sprintf("%s://%s/v2/%s/%s/%s", reg.Scheme(), reg.RegistryStr(), c.repo.RepositoryStr(), kind, id)
}
