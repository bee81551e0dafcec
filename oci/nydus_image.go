package oci

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/registry"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// The nydus image format as nydus-snapshotter's pkg/converter (v0.16) and
// nydusify write it: one layer per RAFS blob, pushed as the blob's own
// bytes (so the blob id is the layer digest's hex), and a last layer that
// is a gzip tar holding the merged bootstrap. test/snapshotter checks these
// values against the snapshotter's exported constants.
const (
	// NydusBlobMediaType is the media type of a blob layer.
	NydusBlobMediaType = "application/vnd.oci.image.layer.nydus.blob.v1"
	// NydusBlobAnnotation is "true" on a blob layer.
	NydusBlobAnnotation = "containerd.io/snapshot/nydus-blob"
	// NydusBootstrapAnnotation is "true" on the bootstrap layer.
	NydusBootstrapAnnotation = "containerd.io/snapshot/nydus-bootstrap"
	// NydusFSVersionAnnotation is the RAFS version of the bootstrap layer.
	NydusFSVersionAnnotation = "containerd.io/snapshot/nydus-fs-version"
	// UncompressedAnnotation is the layer's diff_id (for a blob layer,
	// its own digest: nydus does not compress the blob as a whole).
	UncompressedAnnotation = "containerd.io/uncompressed"
	// NydusOSFeature marks the nydus manifest of an index entry.
	NydusOSFeature = "nydus.remoteimage.v1"
	// NydusBootstrapPath is the bootstrap's name in the bootstrap layer.
	NydusBootstrapPath = "image/image.boot"
	// NydusBlobIDAnnotation is rafsnbd's own: it names the blob id of a
	// blob layer whose id is not its digest (a blob built by an old
	// nydus-image, like the fixture in shared/fixtures/nydus), so that a
	// layout or registry stores it by digest and the reader finds it by
	// id. nydus' own images never need it.
	NydusBlobIDAnnotation = "org.rafsnbd.nydus.blob-id"
)

// ErrNotNydus is wrapped by OpenNydus's error when the image has no nydus
// bootstrap layer: it is some other image, and the caller may read it
// another way.
var ErrNotNydus = errors.New("not a nydus image")

// maxNydusBootstrapLayer bounds the compressed bootstrap layer fetched
// whole (the uncompressed bootstrap is bounded by maxIndexBootstrap).
const maxNydusBootstrapLayer = 512 << 20

// OpenNydusOptions control OpenNydus.
type OpenNydusOptions struct {
	Platform string // default DefaultPlatform()
	Insecure bool
	Keychain authn.Keychain
}

// NydusImage is a nydus image read lazily: its merged bootstrap, fetched
// and checked against the bootstrap layer's digest, and a store that reads
// each blob from the image's repository (or layout) by its layer digest.
type NydusImage struct {
	Ref             string
	ManifestDigest  string
	BootstrapDigest string // the bootstrap layer's
	Bootstrap       []byte
	// Blobs are the blob layers the bootstrap uses, in blob-table order.
	Blobs []NydusBlob
	store blobcache.Store
	stats func() registry.Stats
}

// NydusBlob is one blob layer of a nydus image.
type NydusBlob struct {
	ID     string // the bootstrap's blob id
	Digest string // the layer's
	Size   int64
}

// Store opens the image's blobs by blob id.
func (n *NydusImage) Store() blobcache.Store { return n.store }

// FetchStats are the registry requests and bytes of the blobs' reads
// (zero for an OCI layout).
func (n *NydusImage) FetchStats() registry.Stats {
	if n.stats == nil {
		return registry.Stats{}
	}
	return n.stats()
}

// IsNydusBootstrapLayer reports whether a layer descriptor is a nydus
// bootstrap layer.
func IsNydusBootstrapLayer(d v1.Descriptor) bool {
	return d.Annotations[NydusBootstrapAnnotation] == "true"
}

// IsNydusBlobLayer reports whether a layer descriptor is a nydus blob.
func IsNydusBlobLayer(d v1.Descriptor) bool {
	return string(d.MediaType) == NydusBlobMediaType || d.Annotations[NydusBlobAnnotation] == "true"
}

// OpenNydus resolves ref to a nydus image (from an index, the entry with
// os.feature nydus.remoteimage.v1 for the platform is preferred, as
// nydus-snapshotter does), fetches its bootstrap layer whole, checks its
// digest, takes image/image.boot out of it, and matches every blob of the
// bootstrap's blob table with a blob layer. No blob byte is read: the
// blob cache reads them by range and checks each chunk's digest.
func OpenNydus(ctx context.Context, ref string, opts OpenNydusOptions) (*NydusImage, error) {
	if opts.Platform == "" {
		opts.Platform = DefaultPlatform()
	}
	platform, err := v1.ParsePlatform(opts.Platform)
	if err != nil {
		return nil, fmt.Errorf("oci: platform %q: %w", opts.Platform, err)
	}
	src, err := openSource(ctx, ref, sourceOptions{insecure: opts.Insecure, keychain: opts.Keychain, stall: DefaultStallTimeout})
	if err != nil {
		return nil, err
	}
	what := src.canonical()
	m, mdigest, err := resolveNydusManifest(ctx, src, platform)
	if err != nil {
		return nil, err
	}
	var boot *v1.Descriptor
	for i := range m.Layers {
		if IsNydusBootstrapLayer(m.Layers[i]) {
			boot = &m.Layers[i]
		}
	}
	if boot == nil {
		return nil, fmt.Errorf("oci: %s: manifest %s: %w (no layer has %s=true)", what, mdigest, ErrNotNydus, NydusBootstrapAnnotation)
	}
	if err := checkDigest(boot.Digest); err != nil {
		return nil, fmt.Errorf("oci: %s: bootstrap layer: %w", what, err)
	}
	zb, err := fetchBlob(ctx, src, *boot, maxNydusBootstrapLayer)
	if err != nil {
		return nil, fmt.Errorf("oci: %s: bootstrap layer: %w", what, err)
	}
	bootstrap, err := nydusBootstrapFromLayer(zb)
	if err != nil {
		return nil, fmt.Errorf("oci: %s: bootstrap layer %s: %w", what, boot.Digest, err)
	}
	ri, err := rafs.NewImage(bytes.NewReader(bootstrap), int64(len(bootstrap)))
	if err != nil {
		return nil, fmt.Errorf("oci: %s: bootstrap layer %s: %w", what, boot.Digest, err)
	}
	defer ri.Close()
	if ri.IsTarfs() {
		return nil, fmt.Errorf("oci: %s: bootstrap layer %s holds a tarfs bootstrap, not a nydus image's", what, boot.Digest)
	}

	// Blob layers by blob id: the digest's hex, or rafsnbd's annotation.
	byID := map[string]v1.Descriptor{}
	for _, l := range m.Layers {
		if !IsNydusBlobLayer(l) {
			continue
		}
		if err := checkDigest(l.Digest); err != nil {
			return nil, fmt.Errorf("oci: %s: blob layer: %w", what, err)
		}
		byID[l.Digest.Hex] = l
		if id := l.Annotations[NydusBlobIDAnnotation]; id != "" {
			byID[id] = l
		}
	}
	n := &NydusImage{Ref: what, ManifestDigest: mdigest.String(), BootstrapDigest: boot.Digest.String(), Bootstrap: bootstrap}
	ids := map[string]string{}
	for i := range ri.Blobs {
		id := ri.Blobs[i].ID()
		l, ok := byID[id]
		if !ok {
			return nil, fmt.Errorf("oci: %s: the bootstrap's blob %d (%s) is not a blob layer of manifest %s", what, i, id, mdigest)
		}
		ids[id] = l.Digest.Hex
		n.Blobs = append(n.Blobs, NydusBlob{ID: id, Digest: l.Digest.String(), Size: l.Size})
	}
	raw, stats, err := layerStore(src, opts.Insecure, opts.Keychain)
	if err != nil {
		return nil, err
	}
	n.stats = stats
	n.store = digestStore{raw: raw, digests: ids}
	return n, nil
}

// digestStore opens a blob by id as the layer digest the manifest gives it.
type digestStore struct {
	raw     blobcache.Store
	digests map[string]string // blob id → layer digest hex
}

func (s digestStore) Open(ctx context.Context, id string) (blobcache.Backend, error) {
	d, ok := s.digests[id]
	if !ok {
		return nil, fmt.Errorf("oci: blob %s is not a layer of the image: %w", id, blobcache.ErrNotFound)
	}
	return s.raw.Open(ctx, d)
}

// resolveNydusManifest follows ref to one image manifest, preferring the
// nydus entry of an index.
func resolveNydusManifest(ctx context.Context, src source, platform *v1.Platform) (*v1.Manifest, v1.Hash, error) {
	what := src.canonical()
	raw, digest, mt, err := src.top(ctx, DefaultMaxManifestSize)
	if err != nil {
		return nil, v1.Hash{}, err
	}
	for depth := 0; ; depth++ {
		if mt, err = sniffMediaType(raw, mt); err != nil {
			return nil, v1.Hash{}, fmt.Errorf("oci: %s: manifest %s: %w", what, digest, err)
		}
		if !isIndex(mt) {
			break
		}
		if depth == 2 {
			return nil, v1.Hash{}, fmt.Errorf("oci: %s: indexes nested more than twice", what)
		}
		idx, err := v1.ParseIndexManifest(bytes.NewReader(raw))
		if err != nil {
			return nil, v1.Hash{}, fmt.Errorf("oci: %s: index %s: %w", what, digest, err)
		}
		d, err := pickNydusPlatform(idx, platform)
		if err != nil {
			return nil, v1.Hash{}, fmt.Errorf("oci: %s: index %s: %w", what, digest, err)
		}
		if d.Size > DefaultMaxManifestSize {
			return nil, v1.Hash{}, fmt.Errorf("oci: %s: manifest %s has %d bytes, over the %d-byte limit", what, d.Digest, d.Size, int64(DefaultMaxManifestSize))
		}
		if raw, mt, err = src.manifest(ctx, d.Digest, DefaultMaxManifestSize); err != nil {
			return nil, v1.Hash{}, err
		}
		if got := sha256Hash(raw); got != d.Digest {
			return nil, v1.Hash{}, fmt.Errorf("oci: %s: manifest %s has content digest %s", what, d.Digest, got)
		}
		if mt == "" {
			mt = d.MediaType
		}
		digest = d.Digest
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, v1.Hash{}, fmt.Errorf("oci: %s: manifest %s: %w", what, digest, err)
	}
	if len(m.Layers) > rafs.MaxBlobs+1 {
		return nil, v1.Hash{}, fmt.Errorf("oci: %s: manifest %s: %d layers, at most %d blobs fit one bootstrap", what, digest, len(m.Layers), rafs.MaxBlobs)
	}
	return m, digest, nil
}

// pickNydusPlatform takes the index entry for the platform that carries
// the nydus os.feature, else the one pickPlatform takes.
func pickNydusPlatform(idx *v1.IndexManifest, want *v1.Platform) (v1.Descriptor, error) {
	for _, d := range idx.Manifests {
		if d.Platform != nil && slices.Contains(d.Platform.OSFeatures, NydusOSFeature) && d.Platform.Satisfies(*want) {
			return d, nil
		}
	}
	return pickPlatform(idx, want)
}

// nydusBootstrapFromLayer takes image/image.boot out of a bootstrap layer
// (a gzip tar).
func nydusBootstrapFromLayer(layer []byte) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(layer))
	if err != nil {
		return nil, fmt.Errorf("not a gzip tar: %w", err)
	}
	defer zr.Close()
	tr := tar.NewReader(zr)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil, fmt.Errorf("no %s in it", NydusBootstrapPath)
		}
		if err != nil {
			return nil, fmt.Errorf("reading its tar: %w", err)
		}
		if hdr.Typeflag != tar.TypeReg || path.Clean(strings.TrimLeft(hdr.Name, "/")) != NydusBootstrapPath {
			continue
		}
		if hdr.Size > maxIndexBootstrap {
			return nil, fmt.Errorf("%s of %d bytes (at most %d)", NydusBootstrapPath, hdr.Size, int64(maxIndexBootstrap))
		}
		b, err := readLimited(tr, maxIndexBootstrap)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", NydusBootstrapPath, err)
		}
		if int64(len(b)) != hdr.Size {
			return nil, fmt.Errorf("%s: %d of its %d bytes", NydusBootstrapPath, len(b), hdr.Size)
		}
		return b, nil
	}
}
