package oci

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// layoutPrefix marks a reference to an OCI image layout directory.
const layoutPrefix = "oci:"

// refNameAnnotation tags a manifest in an OCI layout's index.json.
const refNameAnnotation = "org.opencontainers.image.ref.name"

// source is where an image's manifests and blobs come from.
type source interface {
	// top fetches the manifest (or index) the reference names, at most
	// limit bytes, with its digest and media type ("" when the source
	// does not say).
	top(ctx context.Context, limit int64) (raw []byte, digest v1.Hash, mt types.MediaType, err error)
	// manifest fetches a manifest by digest, at most limit bytes; the
	// caller checks the digest.
	manifest(ctx context.Context, d v1.Hash, limit int64) (raw []byte, mt types.MediaType, err error)
	// blob opens a blob for streaming; the caller checks size and digest.
	blob(ctx context.Context, d v1.Hash) (io.ReadCloser, error)
	// canonical names the image for image.json and ResolveImage.
	canonical() string
}

// sourceOptions are what opening a source needs from Options.
type sourceOptions struct {
	insecure  bool
	keychain  authn.Keychain
	transport http.RoundTripper
	stall     time.Duration // see Options.StallTimeout; <= 0: none
}

func openSource(ctx context.Context, ref string, o sourceOptions) (source, error) {
	if strings.HasPrefix(ref, layoutPrefix) {
		return openLayout(strings.TrimPrefix(ref, layoutPrefix))
	}
	return openRegistry(ctx, ref, o)
}

// CanonicalRef is the form of ref that image.json records and ResolveImage
// matches: a registry reference fully qualified
// ("index.docker.io/library/alpine:latest"), a layout reference with an
// absolute path and its tag ("oci:/abs/path:latest").
func CanonicalRef(ref string, insecure bool) (string, error) {
	if p, ok := strings.CutPrefix(ref, layoutPrefix); ok {
		dir, tag, dgst, err := splitLayoutRef(p)
		if err != nil {
			return "", err
		}
		return canonicalLayoutRef(dir, tag, dgst), nil
	}
	var opts []name.Option
	if insecure {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(ref, opts...)
	if err != nil {
		return "", fmt.Errorf("oci: reference %q: %w", ref, err)
	}
	return r.Name(), nil
}

// ---------------------------------------------------------------------------
// Registry

type registrySource struct {
	ref    name.Reference
	client *http.Client
	stall  time.Duration // <= 0: wait for ever
}

func openRegistry(ctx context.Context, ref string, o sourceOptions) (*registrySource, error) {
	var opts []name.Option
	if o.insecure {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(ref, opts...)
	if err != nil {
		return nil, fmt.Errorf("oci: reference %q: %w", ref, err)
	}
	kc := o.keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	base := o.transport
	if base == nil {
		base = remote.DefaultTransport
	}
	reg := r.Context().Registry
	if o.stall > 0 {
		// The ping and token exchange below are a few small requests.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, o.stall, fmt.Errorf("no answer from %s within %s", reg, o.stall))
		defer cancel()
	}
	auth, err := authn.Resolve(ctx, kc, reg)
	if err != nil {
		return nil, fmt.Errorf("oci: credentials for %s: %w", reg, err)
	}
	// The transport pings the registry and runs the token exchange.
	rt, err := transport.NewWithContext(ctx, reg, auth, base, []string{r.Context().Scope(transport.PullScope)})
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && errors.Is(err, context.DeadlineExceeded) {
			err = cause
		}
		return nil, fmt.Errorf("oci: %s: %w", reg, err)
	}
	return &registrySource{ref: r, client: &http.Client{Transport: rt}, stall: o.stall}, nil
}

func (s *registrySource) canonical() string { return s.ref.Name() }

func (s *registrySource) url(kind, id string) string {
	repo := s.ref.Context()
	return fmt.Sprintf("%s://%s/v2/%s/%s/%s", repo.Registry.Scheme(), repo.RegistryStr(), repo.RepositoryStr(), kind, id)
}

// manifestAccept lists every manifest type the converter understands.
var manifestAccept = strings.Join([]string{
	string(types.OCIManifestSchema1), string(types.OCIImageIndex),
	string(types.DockerManifestSchema2), string(types.DockerManifestList),
}, ", ")

// get sends a GET. The request, and every read of the body, fails once it
// has waited s.stall for the registry (see stallWatch).
func (s *registrySource) get(ctx context.Context, url, accept string) (*http.Response, error) {
	w := newStallWatch(ctx, s.stall)
	req, err := http.NewRequestWithContext(w.ctx, http.MethodGet, url, nil)
	if err != nil {
		w.close()
		return nil, err
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	w.arm()
	resp, err := s.client.Do(req)
	w.disarm()
	if err != nil {
		w.close()
		return nil, w.explain(err)
	}
	if err := transport.CheckError(resp, http.StatusOK); err != nil {
		resp.Body.Close()
		w.close()
		return nil, err
	}
	resp.Body = &stallBody{rc: resp.Body, w: w}
	return resp, nil
}

// stallWatch cancels a request's context when the request has waited too
// long for the other side: armed while waiting for the response or for
// body bytes, disarmed while the caller works on what arrived. A registry
// that stops sending in the middle of a layer would otherwise hold a
// conversion for ever (TCP keeps a silent connection open).
type stallWatch struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	timer  *time.Timer // nil: no limit
	limit  time.Duration
	fired  atomic.Bool
}

func newStallWatch(parent context.Context, limit time.Duration) *stallWatch {
	ctx, cancel := context.WithCancelCause(parent)
	w := &stallWatch{ctx: ctx, cancel: cancel}
	if limit > 0 {
		w.timer = time.AfterFunc(limit, func() {
			w.fired.Store(true)
			cancel(fmt.Errorf("the registry sent nothing for %s", limit))
		})
		w.timer.Stop()
		w.limit = limit
	}
	return w
}

func (w *stallWatch) arm() {
	if w.timer != nil {
		w.timer.Reset(w.limit)
	}
}

func (w *stallWatch) disarm() {
	if w.timer != nil {
		w.timer.Stop()
	}
}

// explain replaces the context error a stall caused with what happened.
func (w *stallWatch) explain(err error) error {
	if err != nil && w.fired.Load() {
		return context.Cause(w.ctx)
	}
	return err
}

func (w *stallWatch) close() {
	w.disarm()
	w.cancel(nil)
}

// stallBody is a response body under a stallWatch.
type stallBody struct {
	rc io.ReadCloser
	w  *stallWatch
}

func (b *stallBody) Read(p []byte) (int, error) {
	b.w.arm()
	n, err := b.rc.Read(p)
	b.w.disarm()
	return n, b.w.explain(err)
}

func (b *stallBody) Close() error {
	err := b.rc.Close()
	b.w.close()
	return err
}

func (s *registrySource) fetchManifest(ctx context.Context, id string, limit int64) ([]byte, types.MediaType, error) {
	what := s.ref.Context().String() + ":" + id
	if strings.Contains(id, ":") {
		what = s.ref.Context().String() + "@" + id
	}
	resp, err := s.get(ctx, s.url("manifests", id), manifestAccept)
	if err != nil {
		return nil, "", fmt.Errorf("oci: manifest %s: %w", what, err)
	}
	defer resp.Body.Close()
	if resp.ContentLength > limit {
		return nil, "", fmt.Errorf("oci: manifest %s: %d bytes exceed the %d-byte limit", what, resp.ContentLength, limit)
	}
	raw, err := readLimited(resp.Body, limit)
	if err != nil {
		return nil, "", fmt.Errorf("oci: manifest %s: %w", what, err)
	}
	mt := types.MediaType(strings.TrimSpace(strings.Split(resp.Header.Get("Content-Type"), ";")[0]))
	return raw, mt, nil
}

func (s *registrySource) top(ctx context.Context, limit int64) ([]byte, v1.Hash, types.MediaType, error) {
	raw, mt, err := s.fetchManifest(ctx, s.ref.Identifier(), limit)
	if err != nil {
		return nil, v1.Hash{}, "", err
	}
	d := sha256Hash(raw)
	if want, ok := s.ref.(name.Digest); ok && want.DigestStr() != d.String() {
		return nil, v1.Hash{}, "", fmt.Errorf("oci: manifest %s: content has digest %s", want, d)
	}
	return raw, d, mt, nil
}

func (s *registrySource) manifest(ctx context.Context, d v1.Hash, limit int64) ([]byte, types.MediaType, error) {
	return s.fetchManifest(ctx, d.String(), limit)
}

func (s *registrySource) blob(ctx context.Context, d v1.Hash) (io.ReadCloser, error) {
	resp, err := s.get(ctx, s.url("blobs", d.String()), "")
	if err != nil {
		return nil, fmt.Errorf("oci: blob %s@%s: %w", s.ref.Context(), d, err)
	}
	return resp.Body, nil
}

// ---------------------------------------------------------------------------
// OCI image layout

type layoutSource struct {
	dir    string
	tag    string // "" when selected by digest or as the only manifest
	digest string // "sha256:..." when selected by digest
	path   layout.Path
}

// splitLayoutRef splits "PATH[:TAG]" or "PATH@DIGEST". A colon counts as a
// tag separator only after the last slash, so paths may hold colons in
// directory names.
func splitLayoutRef(s string) (dir, tag, digest string, err error) {
	if s == "" {
		return "", "", "", errors.New("oci: empty layout path (want oci:PATH[:TAG])")
	}
	if i := strings.LastIndex(s, "@"); i > strings.LastIndex(s, "/") {
		dir, digest = s[:i], s[i+1:]
		if _, err := v1.NewHash(digest); err != nil {
			return "", "", "", fmt.Errorf("oci: layout reference %q: %w", s, err)
		}
	} else if i := strings.LastIndex(s, ":"); i > strings.LastIndex(s, "/") {
		dir, tag = s[:i], s[i+1:]
		if tag == "" {
			return "", "", "", fmt.Errorf("oci: layout reference %q: empty tag", s)
		}
	} else {
		dir = s
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", "", "", fmt.Errorf("oci: layout path %q: %w", dir, err)
	}
	return abs, tag, digest, nil
}

func canonicalLayoutRef(dir, tag, digest string) string {
	switch {
	case digest != "":
		return layoutPrefix + dir + "@" + digest
	case tag != "":
		return layoutPrefix + dir + ":" + tag
	}
	return layoutPrefix + dir
}

func openLayout(s string) (*layoutSource, error) {
	dir, tag, dgst, err := splitLayoutRef(s)
	if err != nil {
		return nil, err
	}
	p, err := layout.FromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("oci: %s is not an OCI image layout: %w", dir, err)
	}
	return &layoutSource{dir: dir, tag: tag, digest: dgst, path: p}, nil
}

func (s *layoutSource) canonical() string { return canonicalLayoutRef(s.dir, s.tag, s.digest) }

func (s *layoutSource) top(ctx context.Context, limit int64) ([]byte, v1.Hash, types.MediaType, error) {
	// index.json is a manifest list of its own: the same cap applies.
	if st, err := os.Stat(filepath.Join(s.dir, "index.json")); err != nil {
		return nil, v1.Hash{}, "", fmt.Errorf("oci: layout %s: %w", s.dir, err)
	} else if st.Size() > limit {
		return nil, v1.Hash{}, "", fmt.Errorf("oci: layout %s: index.json has %d bytes, over the %d-byte limit", s.dir, st.Size(), limit)
	}
	ii, err := s.path.ImageIndex()
	if err != nil {
		return nil, v1.Hash{}, "", fmt.Errorf("oci: layout %s: %w", s.dir, err)
	}
	im, err := ii.IndexManifest()
	if err != nil {
		return nil, v1.Hash{}, "", fmt.Errorf("oci: layout %s: index.json: %w", s.dir, err)
	}
	var found []v1.Descriptor
	var tags []string
	for _, d := range im.Manifests {
		t := d.Annotations[refNameAnnotation]
		if t != "" {
			tags = append(tags, t)
		}
		switch {
		case s.digest != "":
			if d.Digest.String() == s.digest {
				found = append(found, d)
			}
		case s.tag != "":
			if t == s.tag {
				found = append(found, d)
			}
		default:
			found = append(found, d)
		}
	}
	what := s.canonical()
	switch {
	case len(found) == 0:
		return nil, v1.Hash{}, "", fmt.Errorf("oci: %s: no such manifest in index.json (tags: %s)", what, strings.Join(tags, ", "))
	case len(found) > 1 && s.tag == "" && s.digest == "":
		return nil, v1.Hash{}, "", fmt.Errorf("oci: %s: index.json lists %d manifests; name one with :TAG (tags: %s)", what, len(found), strings.Join(tags, ", "))
	case len(found) > 1 && found[0].Digest != found[1].Digest:
		return nil, v1.Hash{}, "", fmt.Errorf("oci: %s: index.json gives the tag to %d different manifests", what, len(found))
	}
	d := found[0]
	if d.Size > limit {
		return nil, v1.Hash{}, "", fmt.Errorf("oci: %s: manifest %s has %d bytes, over the %d-byte limit", what, d.Digest, d.Size, limit)
	}
	raw, _, err := s.manifest(ctx, d.Digest, limit)
	if err != nil {
		return nil, v1.Hash{}, "", err
	}
	if got := sha256Hash(raw); got != d.Digest {
		return nil, v1.Hash{}, "", fmt.Errorf("oci: %s: manifest %s has content digest %s", what, d.Digest, got)
	}
	return raw, d.Digest, d.MediaType, nil
}

func (s *layoutSource) manifest(ctx context.Context, d v1.Hash, limit int64) ([]byte, types.MediaType, error) {
	rc, err := s.blob(ctx, d)
	if err != nil {
		return nil, "", err
	}
	defer rc.Close()
	raw, err := readLimited(rc, limit)
	if err != nil {
		return nil, "", fmt.Errorf("oci: layout %s: manifest %s: %w", s.dir, d, err)
	}
	return raw, "", nil
}

func (s *layoutSource) blob(_ context.Context, d v1.Hash) (io.ReadCloser, error) {
	if err := checkDigest(d); err != nil { // it becomes a path under blobs/
		return nil, fmt.Errorf("oci: layout %s: %w", s.dir, err)
	}
	rc, err := s.path.Blob(d)
	if err != nil {
		return nil, fmt.Errorf("oci: layout %s: blob %s: %w", s.dir, d, err)
	}
	return rc, nil
}

// ---------------------------------------------------------------------------

// errTooLarge is wrapped by readLimited's error.
var errTooLarge = errors.New("over the size limit")

// readLimited reads all of r, failing once it passes limit bytes.
func readLimited(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("more than %d bytes: %w", limit, errTooLarge)
	}
	return b, nil
}

func sha256Hash(b []byte) v1.Hash {
	sum := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
}
