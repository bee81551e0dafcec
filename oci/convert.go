package oci

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
	"github.com/rafsnbd/rafsnbd/verity"
)

// ExportMode says which flat disks Convert writes (spec §16).
type ExportMode int

const (
	// ExportNone writes no disk: the bootstraps and tars are the result.
	ExportNone ExportMode = iota
	// ExportLayer writes blobs/<layer>.layer.disk for every layer: the
	// layer's own bootstrap and tar.
	ExportLayer
	// ExportImage writes blobs/<top layer>.image.disk: the merged
	// bootstrap and every layer's tar.
	ExportImage
)

func (m ExportMode) String() string {
	switch m {
	case ExportNone:
		return "none"
	case ExportLayer:
		return "layer"
	case ExportImage:
		return "image"
	}
	return fmt.Sprintf("export(%d)", int(m))
}

// ParseExportMode is the inverse of ExportMode.String.
func ParseExportMode(s string) (ExportMode, error) {
	switch s {
	case "none", "":
		return ExportNone, nil
	case "layer":
		return ExportLayer, nil
	case "image":
		return ExportImage, nil
	}
	return 0, fmt.Errorf("oci: unknown export mode %q (want none, layer or image)", s)
}

// Default limits.
const (
	// DefaultMaxManifestSize caps manifests, indexes and index.json.
	DefaultMaxManifestSize = 8 << 20
	// DefaultMaxConfigSize caps image configs.
	DefaultMaxConfigSize = 8 << 20
	// DefaultConcurrency is how many layers are pulled at once.
	DefaultConcurrency = 3
	// DefaultReserveBytes is the free space conversion leaves on the
	// cache's filesystem.
	DefaultReserveBytes = 256 << 20
	// DefaultStallTimeout is how long a download may wait for its next
	// byte.
	DefaultStallTimeout = time.Minute
)

// Options control Convert. Only CacheDir is required.
type Options struct {
	CacheDir string
	Export   ExportMode
	// Verity appends a dm-verity tree to exported disks, hashing 512-byte
	// data blocks as nydus does; VerityCompat picks veritysetup's bytes
	// (verity.Standard) or nydus' (verity.NydusCompat).
	Verity       bool
	VerityCompat verity.Compat
	// Concurrency bounds the layers converted at once (0: DefaultConcurrency).
	Concurrency int
	// Platform picks the image of an index, "os/arch[/variant]"
	// (default DefaultPlatform()).
	Platform string
	// Insecure allows plain HTTP to the registry.
	Insecure bool
	// Keychain resolves registry credentials (nil: authn.DefaultKeychain).
	Keychain authn.Keychain
	// Transport carries registry requests (nil: remote.DefaultTransport).
	Transport http.RoundTripper
	// MaxManifestSize and MaxConfigSize cap what is read into memory
	// (0: the defaults).
	MaxManifestSize, MaxConfigSize int64
	// ReserveBytes is the free space to leave on the cache's filesystem
	// (0: DefaultReserveBytes; negative: none).
	ReserveBytes int64
	// StallTimeout bounds how long a registry request may wait for its
	// response or its next bytes; a stalled request is retried, resuming
	// where it stopped, a few times and then fails (0: DefaultStallTimeout;
	// negative: wait for ever). Only time spent waiting on the source
	// counts, not time spent writing what arrived.
	StallTimeout time.Duration
	// Progress, when set, receives events from the converting goroutines,
	// possibly at the same time: it must be safe for concurrent use.
	Progress func(Progress)
}

// Phase is what a Progress event reports.
type Phase string

const (
	PhaseResolved  Phase = "resolved"  // Total: compressed bytes of all layers
	PhaseDownload  Phase = "download"  // Done of Total compressed bytes received
	PhaseReused    Phase = "reused"    // the layer was already in the cache
	PhaseBuild     Phase = "build"     // indexing the tar (Total: its size)
	PhaseLayerDone Phase = "layer"     // the layer is converted
	PhaseMerge     Phase = "merge"     // merging the layer bootstraps
	PhaseExport    Phase = "export"    // Done of Total device bytes written to Path
	PhaseImageDone Phase = "converted" // the image bootstrap is ready
)

// Progress is one progress event. Layer is -1 for image-wide phases.
type Progress struct {
	Layer       int
	Digest      string
	Phase       Phase
	Done, Total int64
	Path        string // export: the disk being written
}

// Result describes a converted image. Its JSON form (convert --json) has
// snake_case keys, as every other JSON rafsnbd prints, and durations in
// nanoseconds, named so.
type Result struct {
	Ref            string        `json:"ref"` // canonical reference (CanonicalRef)
	ManifestDigest string        `json:"manifest_digest"`
	ConfigDigest   string        `json:"config_digest"`
	Platform       string        `json:"platform,omitempty"`
	Bootstrap      string        `json:"bootstrap"` // images/<manifest hex>/image.boot
	BlobDir        string        `json:"blob_dir"`  // blobs/
	Layers         []LayerResult `json:"layers"`
	// Reused is set when the image had been converted before: no layer
	// was looked at.
	Reused  bool          `json:"reused"`
	Resolve time.Duration `json:"resolve_ns"` // manifests and config
	Layer   time.Duration `json:"layers_ns"`  // all layers, wall clock
	Merge   time.Duration `json:"merge_ns"`
	Exports []Export      `json:"exports,omitempty"`
}

// LayerResult describes one converted layer.
type LayerResult struct {
	Index     int    `json:"index"`
	Digest    string `json:"digest"`  // of the compressed blob
	DiffID    string `json:"diff_id"` // of the tar: its blob id is the hex part
	MediaType string `json:"media_type"`
	Size      int64  `json:"size"` // compressed bytes
	TarSize   int64  `json:"tar_size"`
	Bootstrap string `json:"bootstrap"`  // layers/<diffid hex>.boot
	Blob      string `json:"blob"`       // blobs/<diffid hex>
	Reused    bool   `json:"reused"`     // bootstrap and tar were in the cache
	TarReused bool   `json:"tar_reused"` // the tar was in the cache, the bootstrap was rebuilt
	// Time spent receiving the blob, decompressing and writing the tar
	// (with both digests), and building the bootstrap. Download and
	// decompression overlap on the network, so Download is the time the
	// converter waited for bytes.
	Download   time.Duration `json:"download_ns"`
	Decompress time.Duration `json:"decompress_ns"`
	Build      time.Duration `json:"build_ns"`
}

// Export is an exported disk file.
type Export struct {
	Kind    string `json:"kind"`             // "image" or "layer"
	DiffID  string `json:"diff_id"`          // the layer (layer) or the top layer (image)
	Path    string `json:"path"`             // absolute in Result, relative to the cache in image.json
	Size    int64  `json:"size"`             // bytes of the file
	MtimeNs int64  `json:"mtime_ns"`         // to notice a file rewritten since
	Verity  string `json:"verity,omitempty"` // the "dm-verity options: ..." line
	Compat  string `json:"compat,omitempty"`
	// DataBlocks, HashOffset and RootHash are the verity parameters
	// (nydus-snapshotter's label "<blocks>,<offset>,sha256:<root>").
	DataBlocks uint64        `json:"data_blocks,omitempty"`
	HashOffset uint64        `json:"hash_offset,omitempty"`
	RootHash   string        `json:"root_hash,omitempty"`
	Took       time.Duration `json:"took_ns,omitempty"` // Result only
	Reused     bool          `json:"reused,omitempty"`  // Result only
}

// limits are the normalized size caps.
type limits struct {
	manifest, config int64
	layers           int
}

type converter struct {
	opts  Options
	cache *cache
	src   source
}

func (cv *converter) report(p Progress) {
	if cv.opts.Progress != nil {
		cv.opts.Progress(p)
	}
}

// Convert pulls the image ref names (a registry reference, or
// "oci:PATH[:TAG]" / "oci:PATH@DIGEST" for an OCI layout) into the cache
// and makes its merged tarfs bootstrap, reusing every layer converted
// before, then exports the disks opts.Export asks for. See the package
// documentation for the cache layout.
func Convert(ctx context.Context, ref string, opts Options) (*Result, error) {
	log := zerolog.Ctx(ctx)
	if opts.Concurrency <= 0 {
		opts.Concurrency = DefaultConcurrency
	}
	if opts.MaxManifestSize <= 0 {
		opts.MaxManifestSize = DefaultMaxManifestSize
	}
	if opts.MaxConfigSize <= 0 {
		opts.MaxConfigSize = DefaultMaxConfigSize
	}
	if opts.ReserveBytes == 0 {
		opts.ReserveBytes = DefaultReserveBytes
	} else if opts.ReserveBytes < 0 {
		opts.ReserveBytes = 0
	}
	if opts.StallTimeout == 0 {
		opts.StallTimeout = DefaultStallTimeout
	}
	explicitPlatform := opts.Platform != ""
	if !explicitPlatform {
		opts.Platform = DefaultPlatform()
	}
	platform, err := v1.ParsePlatform(opts.Platform)
	if err != nil {
		return nil, fmt.Errorf("oci: platform %q: %w", opts.Platform, err)
	}
	c, err := openCache(opts.CacheDir)
	if err != nil {
		return nil, err
	}
	release, err := c.holdShared(ctx) // GC waits for the end of this conversion
	if err != nil {
		return nil, fmt.Errorf("oci: cache %s: %w", c.dir, err)
	}
	defer release()
	start := time.Now()
	src, err := openSource(ctx, ref, sourceOptions{insecure: opts.Insecure, keychain: opts.Keychain, transport: opts.Transport, stall: opts.StallTimeout})
	if err != nil {
		return nil, err
	}
	img, err := resolveImage(ctx, src, platform, limits{manifest: opts.MaxManifestSize, config: opts.MaxConfigSize, layers: rafs.MaxBlobs})
	if err != nil {
		return nil, err
	}
	// A single-platform image has no index to choose from: one of another
	// platform is converted as it is, unless a platform was asked for.
	if got, err := v1.ParsePlatform(img.platform); explicitPlatform && !img.fromIndex && img.platform != "" && (err != nil || !got.Satisfies(*platform)) {
		return nil, fmt.Errorf("oci: %s is an image for %s, not %s", ref, img.platform, opts.Platform)
	}
	cv := &converter{opts: opts, cache: c, src: src}
	var total int64
	for _, l := range img.layers {
		total += l.size
	}
	cv.report(Progress{Layer: -1, Digest: img.manifestDigest.String(), Phase: PhaseResolved, Total: total})
	res := &Result{
		Ref: img.source, ManifestDigest: img.manifestDigest.String(), ConfigDigest: img.configDigest.String(),
		Platform: img.platform, BlobDir: c.blobDir(), Resolve: time.Since(start),
		Bootstrap: filepath.Join(c.imageDir(img.manifestDigest.Hex), "image.boot"),
	}
	log.Debug().Str("ref", res.Ref).Str("manifest", res.ManifestDigest).Int("layers", len(img.layers)).
		Dur("took", res.Resolve).Msg("image resolved")

	unlock, err := c.lock(ctx, "image", img.manifestDigest.Hex, func() {
		log.Info().Str("manifest", res.ManifestDigest).Msg("waiting for another conversion of this image")
	})
	if err != nil {
		return nil, err
	}
	defer unlock()
	removeTemps(c.imageDir(img.manifestDigest.Hex), ".") // an interrupted run's leftovers

	rec, ok := cv.imageDone(img)
	if ok {
		res.Reused = true
		for i, l := range rec.Layers {
			res.Layers = append(res.Layers, LayerResult{Index: i, Digest: l.Digest, DiffID: l.DiffID, MediaType: l.MediaType,
				Size: l.Size, TarSize: l.TarSize, Bootstrap: c.layerBoot(hexOf(l.DiffID)), Blob: c.blobPath(hexOf(l.DiffID)), Reused: true})
		}
	} else {
		if rec, err = cv.convertImage(ctx, img, res); err != nil {
			return nil, err
		}
	}
	cv.report(Progress{Layer: -1, Digest: res.ManifestDigest, Phase: PhaseImageDone})

	if err := cv.export(ctx, img, rec, res); err != nil {
		return nil, err
	}
	return res, nil
}

// convertImage converts the layers and merges them; it is called with the
// image lock held.
func (cv *converter) convertImage(ctx context.Context, img *image, res *Result) (*ImageInfo, error) {
	dir := cv.cache.imageDir(img.manifestDigest.Hex)
	if err := os.MkdirAll(dir, cacheDirMode); err != nil {
		return nil, fmt.Errorf("oci: %w", err)
	}

	start := time.Now()
	res.Layers = make([]LayerResult, len(img.layers))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(cv.opts.Concurrency)
	for _, l := range img.layers {
		g.Go(func() error {
			lr, err := cv.convertLayer(gctx, l)
			if err != nil {
				return err
			}
			res.Layers[l.index] = *lr
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	res.Layer = time.Since(start)

	start = time.Now()
	cv.report(Progress{Layer: -1, Digest: res.ManifestDigest, Phase: PhaseMerge})
	boots := make([]string, len(res.Layers))
	names := make([]string, len(res.Layers))
	for i, l := range res.Layers {
		boots[i], names[i] = l.Bootstrap, fmt.Sprintf("layer %d (%s)", i, l.Digest)
	}
	var merged bytes.Buffer
	if _, err := build.MergeFiles(ctx, boots, &merged, build.MergeOptions{Names: names}); err != nil {
		return nil, fmt.Errorf("oci: %s: %w", img.source, err)
	}
	if err := needSpace(dir, int64(merged.Len()), cv.opts.ReserveBytes, "the image bootstrap"); err != nil {
		return nil, fmt.Errorf("oci: %s: %w", img.source, err)
	}
	if err := atomicfile.WriteFile(res.Bootstrap, merged.Bytes(), cacheFileMode); err != nil {
		return nil, fmt.Errorf("oci: writing %s: %w", res.Bootstrap, err)
	}
	res.Merge = time.Since(start)

	rec := &ImageInfo{
		Ref: img.source, ManifestDigest: res.ManifestDigest, ConfigDigest: res.ConfigDigest,
		Platform: res.Platform, Converted: time.Now().UTC(),
		Bootstrap: cv.cache.rel(res.Bootstrap), BlobDir: cv.cache.rel(res.BlobDir),
	}
	for _, l := range res.Layers {
		rec.Layers = append(rec.Layers, LayerInfo{Digest: l.Digest, DiffID: l.DiffID, MediaType: l.MediaType, Size: l.Size, TarSize: l.TarSize})
	}
	if err := cv.writeRecord(rec); err != nil {
		return nil, err
	}
	return rec, nil
}

// export writes the disks Options.Export asks for, reusing those image.json
// records as made with the same settings and unchanged since.
func (cv *converter) export(ctx context.Context, img *image, rec *ImageInfo, res *Result) error {
	type job struct {
		kind, boot, diffID, path string
	}
	var jobs []job
	switch cv.opts.Export {
	case ExportNone:
		return nil
	case ExportImage:
		top := res.Layers[len(res.Layers)-1].DiffID
		jobs = append(jobs, job{"image", res.Bootstrap, top, filepath.Join(res.BlobDir, DiskName(hexOf(top), "image"))})
	case ExportLayer:
		for _, l := range res.Layers {
			jobs = append(jobs, job{"layer", l.Bootstrap, l.DiffID, filepath.Join(res.BlobDir, DiskName(hexOf(l.DiffID), "layer"))})
		}
	default:
		return fmt.Errorf("oci: unknown export mode %v", cv.opts.Export)
	}
	compat := ""
	if cv.opts.Verity {
		compat = cv.opts.VerityCompat.String()
	}
	for _, j := range jobs {
		if ex, ok := rec.findExport(cv.cache, j.path, j.kind, compat); ok {
			ex.Path, ex.Reused = j.path, true
			res.Exports = append(res.Exports, ex)
			continue
		}
		ex, err := cv.exportDisk(ctx, j.kind, j.boot, j.diffID, j.path, res.ManifestDigest)
		if err != nil {
			return err
		}
		res.Exports = append(res.Exports, *ex)
		stored := *ex
		stored.Path, stored.Took = cv.cache.rel(ex.Path), 0
		rec.setExport(stored)
		if err := cv.writeRecord(rec); err != nil {
			return err
		}
	}
	return nil
}

// exportDisk writes one disk file under the disk's own lock (images with
// the same top layer, and images sharing a layer, write the same names).
func (cv *converter) exportDisk(ctx context.Context, kind, boot, diffID, path, manifest string) (*Export, error) {
	log := zerolog.Ctx(ctx)
	base := filepath.Base(path)
	unlock, err := cv.cache.lock(ctx, "disk", base, func() {
		log.Info().Str("disk", path).Msg("waiting for another export of this disk")
	})
	if err != nil {
		return nil, err
	}
	defer unlock()
	removeTemps(filepath.Dir(path), "."+base+atomicfile.TempMarker)

	dev, err := blockdev.Open(ctx, boot, blockdev.LocalBlobs{Dir: cv.cache.blobDir()})
	if err != nil {
		return nil, fmt.Errorf("oci: export %s: %w", path, err)
	}
	defer dev.Close()
	eo := blockdev.ExportOptions{Progress: func(done int64) {
		cv.report(Progress{Layer: -1, Digest: manifest, Phase: PhaseExport, Done: done, Total: dev.Size(), Path: path})
	}}
	want := dev.Size()
	if cv.opts.Verity {
		p := VerityParams(dev.Composed, cv.opts.VerityCompat)
		eo.Verity = &p
		want = int64(p.HashOffset + p.TreeSize())
	}
	if err := needSpace(filepath.Dir(path), want, cv.opts.ReserveBytes, "the export"); err != nil {
		return nil, fmt.Errorf("oci: export %s: %w", path, err)
	}
	start := time.Now()
	er, err := blockdev.Export(ctx, dev, path, eo)
	if err != nil {
		return nil, fmt.Errorf("oci: export %s: %w", path, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("oci: export %s: %w", path, err)
	}
	ex := &Export{Kind: kind, DiffID: diffID, Path: path, Size: st.Size(), MtimeNs: st.ModTime().UnixNano(), Took: time.Since(start)}
	if er.Tree != nil {
		ex.Verity = er.Tree.Options()
		ex.Compat = cv.opts.VerityCompat.String()
		ex.DataBlocks = er.Tree.Params.DataBlocks
		ex.HashOffset = er.Tree.Params.HashOffset
		ex.RootHash = er.Tree.RootHex()
	}
	log.Debug().Str("disk", path).Int64("bytes", ex.Size).Dur("took", ex.Took).Msg("exported")
	return ex, nil
}

// ---------------------------------------------------------------------------
// image.json

// ImageInfo is what images/<manifest hex>/image.json records about a
// converted image. Paths are relative to the cache directory.
type ImageInfo struct {
	Ref            string      `json:"ref"`
	ManifestDigest string      `json:"manifest_digest"`
	ConfigDigest   string      `json:"config_digest"`
	Platform       string      `json:"platform,omitempty"`
	Converted      time.Time   `json:"converted"`
	Bootstrap      string      `json:"bootstrap"` // relative to the cache
	BlobDir        string      `json:"blob_dir"`
	Layers         []LayerInfo `json:"layers"`
	Exports        []Export    `json:"exports,omitempty"`
}

// LayerInfo is one layer of an ImageInfo.
type LayerInfo struct {
	Digest    string `json:"digest"`
	DiffID    string `json:"diff_id"`
	MediaType string `json:"media_type"`
	Size      int64  `json:"size"`
	TarSize   int64  `json:"tar_size"`
}

func (cv *converter) writeRecord(rec *ImageInfo) error {
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	p := filepath.Join(cv.cache.imageDir(hexOf(rec.ManifestDigest)), "image.json")
	if err := atomicfile.WriteFile(p, append(b, '\n'), cacheFileMode); err != nil {
		return fmt.Errorf("oci: writing %s: %w", p, err)
	}
	return nil
}

func readRecord(path string) (*ImageInfo, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var rec ImageInfo
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if rec.ManifestDigest == "" || rec.Bootstrap == "" || len(rec.Layers) == 0 {
		return nil, fmt.Errorf("%s: incomplete record", path)
	}
	return &rec, nil
}

// imageDone returns the record of an image converted before, if its
// bootstrap and every layer tar are still in place.
func (cv *converter) imageDone(img *image) (*ImageInfo, bool) {
	rec, err := readRecord(filepath.Join(cv.cache.imageDir(img.manifestDigest.Hex), "image.json"))
	if err != nil || len(rec.Layers) != len(img.layers) {
		return nil, false
	}
	for i, l := range rec.Layers {
		if l.DiffID != img.layers[i].diffID.String() {
			return nil, false
		}
	}
	if rec.checkFiles(cv.cache.dir) != nil {
		return nil, false
	}
	return rec, true
}

func (rec *ImageInfo) findExport(c *cache, path, kind, compat string) (Export, bool) {
	rel := c.rel(path)
	for _, ex := range rec.Exports {
		if ex.Path != rel || ex.Kind != kind || ex.Compat != compat || (compat != "") != (ex.Verity != "") {
			continue
		}
		st, err := os.Stat(path)
		if err == nil && st.Size() == ex.Size && st.ModTime().UnixNano() == ex.MtimeNs {
			return ex, true
		}
	}
	return Export{}, false
}

func (rec *ImageInfo) setExport(ex Export) {
	for i := range rec.Exports {
		if rec.Exports[i].Path == ex.Path {
			rec.Exports[i] = ex
			return
		}
	}
	rec.Exports = append(rec.Exports, ex)
}

// hexOf strips "sha256:".
func hexOf(digest string) string {
	h, err := v1.NewHash(digest)
	if err != nil {
		return digest
	}
	return h.Hex
}
