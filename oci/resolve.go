package oci

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// image is a resolved single-platform image.
type image struct {
	source         string // canonical reference
	manifestDigest v1.Hash
	manifest       *v1.Manifest
	config         *v1.ConfigFile
	configDigest   v1.Hash
	platform       string
	fromIndex      bool // chosen from an index by platform
	layers         []layerDesc
}

// layerDesc is one layer to convert.
type layerDesc struct {
	index     int
	digest    v1.Hash // of the blob as stored (compressed)
	diffID    v1.Hash // of the uncompressed tar
	size      int64
	mediaType types.MediaType
}

// manifestKind reads what a manifest is when neither the registry nor the
// descriptor said: OCI manifests may leave mediaType out.
type manifestKind struct {
	SchemaVersion int             `json:"schemaVersion"`
	MediaType     types.MediaType `json:"mediaType"`
	Manifests     json.RawMessage `json:"manifests"`
	Layers        json.RawMessage `json:"layers"`
	Config        json.RawMessage `json:"config"`
}

func sniffMediaType(raw []byte, declared types.MediaType) (types.MediaType, error) {
	var k manifestKind
	if err := json.Unmarshal(raw, &k); err != nil {
		return "", fmt.Errorf("not a JSON manifest: %w", err)
	}
	if k.SchemaVersion == 1 {
		return "", fmt.Errorf("schema 1 (Docker) manifests are not supported: push the image again with a current client")
	}
	if k.SchemaVersion != 2 {
		return "", fmt.Errorf("schemaVersion %d, want 2", k.SchemaVersion)
	}
	mt := k.MediaType
	if mt == "" {
		mt = declared
	}
	switch mt {
	case types.OCIImageIndex, types.DockerManifestList, types.OCIManifestSchema1, types.DockerManifestSchema2:
		return mt, nil
	case "", "application/json", "application/octet-stream", "text/plain":
		// Untyped: judge by content.
		switch {
		case k.Manifests != nil && k.Layers == nil:
			return types.OCIImageIndex, nil
		case k.Layers != nil && k.Config != nil:
			return types.OCIManifestSchema1, nil
		}
		return "", fmt.Errorf("cannot tell whether this is a manifest or an index")
	}
	return "", fmt.Errorf("unsupported manifest media type %q", mt)
}

func isIndex(mt types.MediaType) bool {
	return mt == types.OCIImageIndex || mt == types.DockerManifestList
}

// DefaultPlatform is linux and the architecture rafsnbd runs on.
func DefaultPlatform() string { return "linux/" + runtime.GOARCH }

// resolveImage follows the reference to one image manifest and its config.
func resolveImage(ctx context.Context, src source, platform *v1.Platform, lim limits) (*image, error) {
	what := src.canonical()
	raw, digest, mt, err := src.top(ctx, lim.manifest)
	if err != nil {
		return nil, err
	}
	// An index may point at another index; real images nest at most once.
	fromIndex := false
	for depth := 0; ; depth++ {
		if mt, err = sniffMediaType(raw, mt); err != nil {
			return nil, fmt.Errorf("oci: %s: manifest %s: %w", what, digest, err)
		}
		if !isIndex(mt) {
			break
		}
		if depth == 2 {
			return nil, fmt.Errorf("oci: %s: indexes nested more than twice", what)
		}
		idx, err := v1.ParseIndexManifest(bytes.NewReader(raw))
		if err != nil {
			return nil, fmt.Errorf("oci: %s: index %s: %w", what, digest, err)
		}
		d, err := pickPlatform(idx, platform)
		if err != nil {
			return nil, fmt.Errorf("oci: %s: index %s: %w", what, digest, err)
		}
		fromIndex = true
		if d.Size > lim.manifest {
			return nil, fmt.Errorf("oci: %s: manifest %s has %d bytes, over the %d-byte limit", what, d.Digest, d.Size, lim.manifest)
		}
		if raw, mt, err = src.manifest(ctx, d.Digest, lim.manifest); err != nil {
			return nil, err
		}
		if got := sha256Hash(raw); got != d.Digest {
			return nil, fmt.Errorf("oci: %s: manifest %s has content digest %s", what, d.Digest, got)
		}
		if mt == "" {
			mt = d.MediaType
		}
		digest = d.Digest
	}

	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("oci: %s: manifest %s: %w", what, digest, err)
	}
	img := &image{source: what, manifestDigest: digest, manifest: m, configDigest: m.Config.Digest, fromIndex: fromIndex}
	if m.Config.Size > lim.config {
		return nil, fmt.Errorf("oci: %s: config %s has %d bytes, over the %d-byte limit", what, m.Config.Digest, m.Config.Size, lim.config)
	}
	if err := checkDigest(m.Config.Digest); err != nil {
		return nil, fmt.Errorf("oci: %s: config: %w", what, err)
	}
	rc, err := src.blob(ctx, m.Config.Digest) // its error leaves naming the blob to us
	if err != nil {
		return nil, fmt.Errorf("oci: %s: config %s: %w", what, m.Config.Digest, err)
	}
	cfgRaw, err := readLimited(rc, lim.config)
	rc.Close()
	if err != nil {
		return nil, fmt.Errorf("oci: %s: config %s: %w", what, m.Config.Digest, err)
	}
	if got := sha256Hash(cfgRaw); got != m.Config.Digest {
		return nil, fmt.Errorf("oci: %s: config %s has content digest %s", what, m.Config.Digest, got)
	}
	if img.config, err = v1.ParseConfigFile(bytes.NewReader(cfgRaw)); err != nil {
		return nil, fmt.Errorf("oci: %s: config %s: %w", what, m.Config.Digest, err)
	}
	img.platform = configPlatform(img.config)

	diffIDs := img.config.RootFS.DiffIDs
	if len(diffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("oci: %s: manifest has %d layers but the config lists %d diff_ids", what, len(m.Layers), len(diffIDs))
	}
	if len(m.Layers) == 0 {
		return nil, fmt.Errorf("oci: %s: the image has no layers", what)
	}
	if len(m.Layers) > lim.layers {
		return nil, fmt.Errorf("oci: %s: %d layers, at most %d fit one bootstrap", what, len(m.Layers), lim.layers)
	}
	for i, l := range m.Layers {
		if err := checkDigest(l.Digest); err != nil {
			return nil, fmt.Errorf("oci: %s: layer %d: %w", what, i, err)
		}
		if err := checkDigest(diffIDs[i]); err != nil {
			return nil, fmt.Errorf("oci: %s: layer %d diff_id: %w", what, i, err)
		}
		if l.Size < 0 {
			return nil, fmt.Errorf("oci: %s: layer %d (%s): negative size %d", what, i, l.Digest, l.Size)
		}
		if _, err := decompressorFor(l.MediaType); err != nil {
			return nil, fmt.Errorf("oci: %s: layer %d (%s): %w", what, i, l.Digest, err)
		}
		img.layers = append(img.layers, layerDesc{index: i, digest: l.Digest, diffID: diffIDs[i], size: l.Size, mediaType: l.MediaType})
	}
	return img, nil
}

// checkDigest accepts sha256 only: blobs are named by their sha256 hex.
func checkDigest(h v1.Hash) error {
	if h.Algorithm != "sha256" || len(h.Hex) != 64 || strings.Trim(h.Hex, "0123456789abcdef") != "" {
		return fmt.Errorf("unsupported digest %q (want sha256:<64 hex digits>)", h.String())
	}
	return nil
}

// pickPlatform chooses the index entry for the platform.
func pickPlatform(idx *v1.IndexManifest, want *v1.Platform) (v1.Descriptor, error) {
	var seen []string
	for _, d := range idx.Manifests {
		if d.Platform == nil {
			continue
		}
		seen = append(seen, d.Platform.String())
		if d.Platform.Satisfies(*want) {
			return d, nil
		}
	}
	// An index of one untagged manifest (common in OCI layouts) is that image.
	if len(idx.Manifests) == 1 && idx.Manifests[0].Platform == nil {
		return idx.Manifests[0], nil
	}
	return v1.Descriptor{}, fmt.Errorf("no manifest for platform %s (has: %s)", want, strings.Join(seen, ", "))
}

func configPlatform(c *v1.ConfigFile) string {
	p := v1.Platform{OS: c.OS, Architecture: c.Architecture, Variant: c.Variant}
	if p.OS == "" && p.Architecture == "" {
		return ""
	}
	return p.String()
}

// openResolved opens the image ref names and resolves it to one platform
// ("os/arch[/variant]", "" for DefaultPlatform), with the default limits.
func openResolved(ctx context.Context, ref, platform string, o sourceOptions) (source, *image, error) {
	if platform == "" {
		platform = DefaultPlatform()
	}
	p, err := v1.ParsePlatform(platform)
	if err != nil {
		return nil, nil, fmt.Errorf("oci: platform %q: %w", platform, err)
	}
	src, err := openSource(ctx, ref, o)
	if err != nil {
		return nil, nil, err
	}
	img, err := resolveImage(ctx, src, p, limits{manifest: DefaultMaxManifestSize, config: DefaultMaxConfigSize, layers: rafs.MaxBlobs})
	if err != nil {
		return nil, nil, err
	}
	return src, img, nil
}
