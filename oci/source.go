package oci

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/blobcache/registry"
	"github.com/rafsnbd/rafsnbd/internal/regclient"
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

// parseRegistryRef parses a registry reference, explaining in one line the
// other transports skopeo users spell images with.
func parseRegistryRef(ref string, insecure bool) (name.Reference, error) {
	if t := regclient.SkopeoTransport(ref); t != "" {
		how := "copy the image into a layout first (skopeo copy " + ref + " oci:DIR:TAG) and convert oci:DIR:TAG"
		if t == "oci-archive" {
			how = "an OCI archive is a tar of a layout: extract it (tar -xf) and convert oci:DIR[:TAG]"
		}
		return nil, fmt.Errorf("oci: %s: rafsnbd reads registries and OCI layouts, not skopeo's %s: transport; %s", ref, t, how)
	}
	r, err := regclient.ParseReference(ref, insecure)
	if err != nil {
		return nil, fmt.Errorf("oci: %w", err)
	}
	return r, nil
}

// CanonicalRef is the form of ref that image.json records and ResolveImage
// matches: a registry reference fully qualified
// ("index.docker.io/library/alpine:latest", also for skopeo's
// "docker://alpine"), a layout reference with an absolute path and its tag
// ("oci:/abs/path:latest").
func CanonicalRef(ref string, insecure bool) (string, error) {
	if p, ok := strings.CutPrefix(ref, layoutPrefix); ok {
		dir, tag, dgst, err := splitLayoutRef(p)
		if err != nil {
			return "", err
		}
		return canonicalLayoutRef(dir, tag, dgst), nil
	}
	r, err := parseRegistryRef(ref, insecure)
	if err != nil {
		return "", err
	}
	return r.Name(), nil
}

// ---------------------------------------------------------------------------
// Registry

// registrySource pulls through internal/regclient, the registry client the
// lazy blob backend uses too (one stall, retry and auth model).
type registrySource struct {
	ref    name.Reference
	client *regclient.Client
}

// openRegistry parses the reference; the registry is contacted (ping,
// token exchange, bounded by the stall timeout) by the first fetch.
func openRegistry(_ context.Context, ref string, o sourceOptions) (*registrySource, error) {
	r, err := parseRegistryRef(ref, o.insecure)
	if err != nil {
		return nil, err
	}
	stall := o.stall
	if stall <= 0 {
		stall = -1 // regclient: wait for ever
	}
	c := regclient.New(r.Context(), regclient.Options{Insecure: o.insecure, Keychain: o.keychain, Transport: o.transport, StallTimeout: stall})
	return &registrySource{ref: r, client: c}, nil
}

func (s *registrySource) canonical() string { return s.ref.Name() }

// manifestAccept lists every manifest type the converter understands.
var manifestAccept = strings.Join([]string{
	string(types.OCIManifestSchema1), string(types.OCIImageIndex),
	string(types.DockerManifestSchema2), string(types.DockerManifestList),
}, ", ")

func (s *registrySource) fetchManifest(ctx context.Context, id string, limit int64) ([]byte, types.MediaType, error) {
	raw, mt, err := s.client.Manifest(ctx, id, manifestAccept, limit)
	if err != nil {
		what := s.ref.Context().String() + ":" + id
		if strings.Contains(id, ":") {
			what = s.ref.Context().String() + "@" + id
		}
		return nil, "", fmt.Errorf("oci: %s: %w", what, err)
	}
	return raw, types.MediaType(mt), nil
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

// blob's error names neither the image nor the digest: the caller names
// what it asked for ("layer 0 (sha256:...)", "IMAGE: config sha256:...").
func (s *registrySource) blob(ctx context.Context, d v1.Hash) (io.ReadCloser, error) {
	return s.client.Blob(ctx, d.String())
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
		return nil, "", fmt.Errorf("oci: manifest %s: %w", d, err)
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
		return nil, fmt.Errorf("layout %s: %w", s.dir, err)
	}
	rc, err := s.path.Blob(d)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("layout %s: no such blob", s.dir)
	} else if err != nil {
		return nil, fmt.Errorf("layout %s: %w", s.dir, err) // the path names the blob
	}
	return rc, nil
}

// ---------------------------------------------------------------------------

// errTooLarge is wrapped by readLimited's error.
var errTooLarge = regclient.ErrTooLarge

// readLimited reads all of r, failing once it passes limit bytes.
func readLimited(r io.Reader, limit int64) ([]byte, error) { return regclient.ReadLimited(r, limit) }

func sha256Hash(b []byte) v1.Hash {
	sum := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
}

// layerStore reads an image's blobs by digest, lazily, from where src
// found the image: the registry repository (with its request statistics),
// or the layout's blobs/sha256.
func layerStore(src source, insecure bool, keychain authn.Keychain) (blobcache.Store, func() registry.Stats, error) {
	switch s := src.(type) {
	case *registrySource:
		rs, err := registry.New(s.ref.Context().String(), registry.Options{Insecure: insecure, Keychain: keychain})
		if err != nil {
			return nil, nil, err
		}
		return rs, rs.Stats, nil
	case *layoutSource:
		return localfs.New(filepath.Join(s.dir, "blobs", "sha256")), nil, nil
	}
	return nil, nil, fmt.Errorf("oci: cannot read blobs from %s", src.canonical())
}
