// Package registry is the blobcache backend for blobs stored in an OCI
// distribution registry: each read is an HTTP Range GET of
// /v2/<repository>/blobs/sha256:<blob id>, so only the bytes a reader needs
// cross the network.
//
// The requests go through internal/regclient, the registry client image
// conversion uses too: credentials from a go-containerregistry keychain
// (by default the docker config file and credential helpers, as `docker
// pull` uses), go-containerregistry's transport for the bearer-token
// dance, the standard proxy environment variables (HTTP_PROXY,
// HTTPS_PROXY, NO_PROXY; a P2P distribution proxy can sit in front of the
// registry; Go never proxies loopback addresses), a stall timeout that
// counts only time spent waiting on the registry, retries with backoff of
// what a new request can cure (connection errors, resets, truncated
// bodies, stalls, 408/429/5xx), resuming after the bytes already received,
// and a bound on the requests in flight per Store.
package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/internal/regclient"
)

// DefaultStallTimeout is how long a read waits for the registry by
// default: shorter than conversion's, because a block-device reader is
// waiting behind it.
const DefaultStallTimeout = 30 * time.Second

// Options tune a Store. The zero value is usable.
type Options struct {
	// Keychain resolves credentials; nil means authn.DefaultKeychain
	// (docker config file and credential helpers).
	Keychain authn.Keychain
	// Insecure allows plain HTTP and is needed for registries that are not
	// on loopback (go-containerregistry already uses HTTP there).
	Insecure bool
	// Transport is the base HTTP transport; nil means a clone of
	// go-containerregistry's remote.DefaultTransport, which honours the
	// proxy environment variables.
	Transport http.RoundTripper
	// StallTimeout fails (and retries) a request that has waited this long
	// for the registry's answer or its next bytes (0: DefaultStallTimeout;
	// negative: wait for ever).
	StallTimeout time.Duration
	// Retries is how many times a failed request is retried (default 4;
	// negative means none).
	Retries int
	// Backoff is the first retry delay, doubled for each further retry up
	// to 5s, with up to 50% random jitter (default 200ms).
	Backoff time.Duration
	// MaxConcurrency bounds the requests in flight (default 8).
	MaxConcurrency int
}

// Store is one repository of a registry; blobs are opened by blob id,
// which is the hex sha256 digest of the blob (the layer digest).
type Store struct {
	client *regclient.Client
}

var _ blobcache.Store = (*Store)(nil)

// New returns the store for repository ref ("[docker://]host[:port]/path";
// any tag or digest is ignored). Nothing is contacted until a blob is
// opened.
func New(ref string, opts Options) (*Store, error) {
	repo, err := regclient.ParseRepository(ref, opts.Insecure)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	stall := opts.StallTimeout
	if stall == 0 {
		stall = DefaultStallTimeout
	}
	return &Store{client: regclient.New(repo, regclient.Options{
		Insecure: opts.Insecure, Keychain: opts.Keychain, Transport: opts.Transport,
		StallTimeout: stall, Retries: opts.Retries, Backoff: opts.Backoff, MaxConcurrency: opts.MaxConcurrency,
	})}, nil
}

// Repository is the repository blobs are read from.
func (s *Store) Repository() name.Repository { return s.client.Repository() }

// Stats are counters over the store's lifetime.
type Stats = regclient.Stats

// Stats returns the store's counters.
func (s *Store) Stats() Stats { return s.client.Stats() }

// Open returns the backend of blob sha256:blobID. It does not contact the
// registry; a missing blob shows up on first read.
func (s *Store) Open(ctx context.Context, blobID string) (blobcache.Backend, error) {
	hex := strings.TrimPrefix(blobID, "sha256:")
	if len(hex) != 64 || strings.Trim(hex, "0123456789abcdef") != "" {
		return nil, fmt.Errorf("registry: blob id %q is not a sha256 hex digest", blobID)
	}
	return &Blob{client: s.client, digest: "sha256:" + hex, size: -1}, nil
}

// Blob reads one blob with Range requests.
type Blob struct {
	client *regclient.Client
	digest string

	sizeMu sync.Mutex
	size   int64 // -1 until known
}

// fail names the blob once, in front of what went wrong; a 404 wraps
// blobcache.ErrNotFound.
func (b *Blob) fail(err error) error {
	if errors.Is(err, regclient.ErrNotFound) {
		err = notFound{err}
	}
	return fmt.Errorf("registry: %s@%s: %w", b.client.Repository(), b.digest, err)
}

// notFound is a 404 that is also blobcache.ErrNotFound, without saying
// "not found" twice.
type notFound struct{ error }

func (e notFound) Unwrap() error      { return e.error }
func (notFound) Is(target error) bool { return target == blobcache.ErrNotFound }

// ReadAt reads len(p) stored bytes at off with one or more Range requests.
// It returns io.EOF when the blob ends before p is full.
func (b *Blob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, eof, err := b.client.ReadBlobAt(ctx, b.digest, p, off)
	if err != nil {
		return n, b.fail(err)
	}
	if eof && n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Size is the blob's stored size, from a HEAD request (asked once).
func (b *Blob) Size(ctx context.Context) (int64, error) {
	b.sizeMu.Lock()
	defer b.sizeMu.Unlock()
	if b.size >= 0 {
		return b.size, nil
	}
	n, err := b.client.BlobSize(ctx, b.digest)
	if err != nil {
		return 0, b.fail(err)
	}
	b.size = n
	return n, nil
}
