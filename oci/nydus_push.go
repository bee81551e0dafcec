package oci

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"strings"
	"sync/atomic"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/match"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/rafsnbd/rafsnbd/internal/ctxio"
)

// NydusBlobFile is a RAFS blob to publish as a blob layer.
type NydusBlobFile struct {
	// ID is the bootstrap's blob id. When it is not the sha256 of the
	// file (old nydus blobs), the layer carries NydusBlobIDAnnotation.
	ID   string
	Path string
}

// NydusPublishOptions control PublishNydus.
type NydusPublishOptions struct {
	Insecure bool
	Keychain authn.Keychain
	// Transport is the base HTTP transport (nil: go-containerregistry's).
	Transport http.RoundTripper
}

// NydusPublished says what PublishNydus wrote.
type NydusPublished struct {
	Ref            string `json:"ref"`
	IndexDigest    string `json:"index"`
	ManifestDigest string `json:"manifest"`
	// Layers are the manifest's layers: the blobs, then the bootstrap.
	Layers []v1.Descriptor `json:"layers"`
	// PushedBytes are the request body bytes sent to the registry (blobs
	// it had already are not sent again); 0 for a layout.
	PushedBytes int64 `json:"pushed_bytes"`
}

// PublishNydus writes a nydus image to dst (a registry reference or
// oci:DIR[:TAG]): an OCI index with one manifest, whose platform (taken
// from base) carries the os.feature nydus.remoteimage.v1; its layers are
// the blobs (media type NydusBlobMediaType, annotated nydus-blob and
// uncompressed = their own digest) and last the bootstrap layer (a gzip
// tar holding image/image.boot, annotated nydus-bootstrap, nydus-fs-version
// 6 and uncompressed = the tar's digest), as nydus-snapshotter's converter
// lays them out. The config is base's with rootfs.diff_ids the layers'
// uncompressed digests; base's history is kept (with a bootstrap entry
// appended) only when it still matches the layers.
func PublishNydus(ctx context.Context, dst string, base *v1.ConfigFile, blobs []NydusBlobFile, bootstrap []byte, opts NydusPublishOptions) (*NydusPublished, error) {
	if base == nil {
		base = &v1.ConfigFile{OS: "linux", Architecture: strings.TrimPrefix(DefaultPlatform(), "linux/")}
	}
	var layers []mutate.Addendum
	for _, b := range blobs {
		l, err := newFileLayer(ctx, b.Path)
		if err != nil {
			return nil, fmt.Errorf("oci: nydus blob %s: %w", b.ID, err)
		}
		ann := map[string]string{NydusBlobAnnotation: "true", UncompressedAnnotation: l.digest.String()}
		if b.ID != l.digest.Hex {
			ann[NydusBlobIDAnnotation] = b.ID
		}
		layers = append(layers, mutate.Addendum{Layer: l, MediaType: NydusBlobMediaType, Annotations: ann})
	}
	bl, err := nydusBootstrapLayer(bootstrap)
	if err != nil {
		return nil, err
	}
	layers = append(layers, mutate.Addendum{Layer: bl, MediaType: types.OCILayer, Annotations: map[string]string{
		NydusBootstrapAnnotation: "true", NydusFSVersionAnnotation: "6", UncompressedAnnotation: bl.diffID.String(),
	}})

	cfg := base.DeepCopy()
	cfg.RootFS = v1.RootFS{Type: "layers"}
	for _, a := range layers {
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, a.Layer.(*nydusLayer).diffID)
	}
	nonEmpty := 0
	for _, h := range cfg.History {
		if !h.EmptyLayer {
			nonEmpty++
		}
	}
	if nonEmpty == len(blobs) {
		cfg.History = append(cfg.History, v1.History{CreatedBy: "rafsnbd convert --format nydus", Comment: "Nydus Bootstrap Layer"})
	} else {
		cfg.History = nil
	}

	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	if img, err = mutate.Append(img, layers...); err != nil {
		return nil, fmt.Errorf("oci: nydus image: %w", err)
	}
	// After Append, which adds its own diff_ids and history.
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return nil, fmt.Errorf("oci: nydus image: %w", err)
	}
	platform := &v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant, OSVersion: cfg.OSVersion,
		OSFeatures: append(append([]string(nil), cfg.OSFeatures...), NydusOSFeature)}
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: platform}})

	md, err := img.Digest()
	if err != nil {
		return nil, fmt.Errorf("oci: nydus image: %w", err)
	}
	id, err := idx.Digest()
	if err != nil {
		return nil, fmt.Errorf("oci: nydus image: %w", err)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("oci: nydus image: %w", err)
	}
	res := &NydusPublished{IndexDigest: id.String(), ManifestDigest: md.String(), Layers: m.Layers}
	if p, ok := strings.CutPrefix(dst, layoutPrefix); ok {
		dir, tag, dgst, err := splitLayoutRef(p)
		if err != nil {
			return nil, err
		}
		if dgst != "" {
			return nil, fmt.Errorf("oci: %s: name the destination with a tag, not a digest", dst)
		}
		res.Ref = canonicalLayoutRef(dir, tag, "")
		if err := putLayoutIndex(dir, tag, idx); err != nil {
			return nil, fmt.Errorf("oci: %s: %w", res.Ref, err)
		}
		return res, nil
	}
	ref, err := parseRegistryRef(dst, opts.Insecure)
	if err != nil {
		return nil, err
	}
	res.Ref = ref.Name()
	kc := opts.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	base2 := opts.Transport
	if base2 == nil {
		base2 = remote.DefaultTransport
	}
	ct := &countingTransport{base: base2}
	if err := remote.WriteIndex(ref, idx, remote.WithContext(ctx), remote.WithAuthFromKeychain(kc), remote.WithTransport(ct)); err != nil {
		return nil, fmt.Errorf("oci: pushing %s: %w", res.Ref, err)
	}
	res.PushedBytes = ct.sent.Load()
	return res, nil
}

// putLayoutIndex puts idx into the layout at dir (created when missing),
// tagged tag (untagged entries are replaced when tag is "").
func putLayoutIndex(dir, tag string, idx v1.ImageIndex) error {
	p, err := layout.FromPath(dir)
	if errors.Is(err, fs.ErrNotExist) {
		p, err = layout.Write(dir, empty.Index)
	}
	if err != nil {
		return err
	}
	if tag == "" {
		return p.ReplaceIndex(idx, func(d v1.Descriptor) bool { return d.Annotations[refNameAnnotation] == "" })
	}
	return p.ReplaceIndex(idx, match.Annotation(refNameAnnotation, tag), layout.WithAnnotations(map[string]string{refNameAnnotation: tag}))
}

// nydusBootstrapLayer packs a bootstrap as nydus does: a gzip tar of the
// directory image/ and image/image.boot.
func nydusBootstrapLayer(bootstrap []byte) (*nydusLayer, error) {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	if err := tw.WriteHeader(&tar.Header{Name: "image", Mode: 0o755, Typeflag: tar.TypeDir, Format: tar.FormatPAX}); err != nil {
		return nil, err
	}
	if err := tw.WriteHeader(&tar.Header{Name: NydusBootstrapPath, Mode: 0o444, Size: int64(len(bootstrap)), Typeflag: tar.TypeReg, Format: tar.FormatPAX}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(bootstrap); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	var zb bytes.Buffer
	zw := gzip.NewWriter(&zb)
	if _, err := zw.Write(tb.Bytes()); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	z := zb.Bytes()
	return &nydusLayer{digest: sha256Hash(z), diffID: sha256Hash(tb.Bytes()), size: int64(len(z)), mt: types.OCILayer,
		open: func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(z)), nil }}, nil
}

// newFileLayer is a blob file as a layer: its digest is the digest of its
// bytes, and so is its diff_id (a nydus blob is not compressed as a whole).
func newFileLayer(ctx context.Context, path string) (*nydusLayer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	d, err := hashFile(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &nydusLayer{digest: d, diffID: d, size: st.Size(), mt: NydusBlobMediaType,
		open: func() (io.ReadCloser, error) { return os.Open(path) }}, nil
}

// nydusLayer is a layer whose digests are known before it is written.
type nydusLayer struct {
	digest, diffID v1.Hash
	size           int64
	mt             types.MediaType
	open           func() (io.ReadCloser, error)
}

func (l *nydusLayer) Digest() (v1.Hash, error)             { return l.digest, nil }
func (l *nydusLayer) DiffID() (v1.Hash, error)             { return l.diffID, nil }
func (l *nydusLayer) Compressed() (io.ReadCloser, error)   { return l.open() }
func (l *nydusLayer) Uncompressed() (io.ReadCloser, error) { return l.open() }
func (l *nydusLayer) Size() (int64, error)                 { return l.size, nil }
func (l *nydusLayer) MediaType() (types.MediaType, error)  { return l.mt, nil }

// countingTransport counts the request body bytes sent.
type countingTransport struct {
	base http.RoundTripper
	sent atomic.Int64
}

func (t *countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil && req.Body != http.NoBody {
		req = req.Clone(req.Context())
		req.Body = &countingBody{ReadCloser: req.Body, n: &t.sent}
	}
	return t.base.RoundTrip(req)
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// hashFile is the sha256 digest of r's bytes, read until ctx is done.
func hashFile(ctx context.Context, r io.Reader) (v1.Hash, error) {
	h := sha256.New()
	if _, err := io.Copy(h, ctxio.NewReader(ctx, r)); err != nil {
		return v1.Hash{}, err
	}
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}, nil
}
