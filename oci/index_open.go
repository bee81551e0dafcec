package oci

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/registry"
	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/internal/gzran"
	"github.com/rafsnbd/rafsnbd/internal/zstdran"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/verity"
)

// Bounds on what an index artifact may make the reader fetch and hold.
const (
	maxIndexConfig    = 4 << 20
	maxIndexBootstrap = 1 << 30 // uncompressed
	maxIndexBlob      = 1 << 30 // any other artifact blob
)

// OpenIndexOptions control OpenIndexed.
type OpenIndexOptions struct {
	Platform string // default DefaultPlatform()
	Insecure bool
	Keychain authn.Keychain
	// RootHash, hex, pins the verity root the index must have; an index
	// with another root is refused.
	RootHash string
	// CacheDir, when set, keeps the artifact's manifest and blobs (content
	// addressed, checked on every read) so that a restart does not fetch
	// them again; see IndexArtifactCacheDir.
	CacheDir string
	// UnitSize is the cache unit of the layers: a power of two from 64 KiB
	// to 16 MiB (0: 64 KiB, one verity group, so a cold read fetches no
	// more than the checkpoint spans of that group).
	UnitSize int64
}

// DefaultLazyUnitSize is OpenIndexOptions.UnitSize's default.
const DefaultLazyUnitSize = blobcache.VerityGroupSize

// IndexedImage is an image read lazily through the index artifact that
// 'rafsnbd index' published beside it (issue 12): its merged bootstrap,
// and a blob store whose layers are read by range (through the gzip or zstd
// checkpoints) and checked against the verity tree of the merged device.
type IndexedImage struct {
	Ref            string
	ManifestDigest string
	ArtifactDigest string
	RootHash       string
	// Bootstrap is the merged bootstrap, checked against the tree by
	// Verity.CheckBootstrap once the device is composed.
	Bootstrap []byte
	Verity    *blobcache.DeviceVerity
	// Layers are the image's layers, in order, as the index has them.
	Layers []IndexLayer
	// Prefetch is what the index says to fetch first.
	Prefetch IndexPrefetch
	// ArtifactFetched is the bytes of the index artifact downloaded (0
	// when all of it came from OpenIndexOptions.CacheDir).
	ArtifactFetched int64
	stats           func() registry.Stats
}

// Store is the blob store the composed device reads layers from.
func (ii *IndexedImage) Store() blobcache.Store { return ii.Verity.Store() }

// FetchStats are the registry requests and bytes of the layers' reads
// (zero for an OCI layout).
func (ii *IndexedImage) FetchStats() registry.Stats {
	if ii.stats == nil {
		return registry.Stats{}
	}
	return ii.stats()
}

// Close releases the layers' backends.
func (ii *IndexedImage) Close() error { return ii.Verity.Close() }

// OpenIndexed finds the index artifact of the image ref names (its
// referrers: the OCI 1.1 API, else the sha256-<hex> tag; or the layout's
// index.json), fetches it, checks its blobs' digests, that it is the
// index of this image, and that its level-1 digests make its root hash
// (opts.RootHash, when given), and returns what the device is composed
// from. Nothing of the layers is read.
func OpenIndexed(ctx context.Context, ref string, opts OpenIndexOptions) (*IndexedImage, error) {
	if opts.Platform == "" {
		opts.Platform = DefaultPlatform()
	}
	if opts.UnitSize == 0 {
		opts.UnitSize = DefaultLazyUnitSize
	}
	pin := strings.ToLower(opts.RootHash)
	if pin != "" {
		if b, err := hex.DecodeString(pin); err != nil || len(b) != sha256.Size {
			return nil, fmt.Errorf("oci: root hash %q is not 64 hex digits", opts.RootHash)
		}
	}
	src, img, err := openResolved(ctx, ref, opts.Platform, sourceOptions{insecure: opts.Insecure, keychain: opts.Keychain, stall: DefaultStallTimeout})
	if err != nil {
		return nil, err
	}
	cands, err := indexCandidates(ctx, src, img.manifestDigest, opts.Keychain)
	if err != nil {
		return nil, fmt.Errorf("oci: %s: looking for its index: %w", img.source, err)
	}
	if len(cands) == 0 {
		return nil, fmt.Errorf("oci: %s: not converted, and no index of it (%s) was found: run rafsnbd index %s", img.source, img.manifestDigest, ref)
	}
	var errs []string
	fetcher := &artifactFetcher{src: src}
	if opts.CacheDir != "" {
		fetcher.dir = IndexArtifactCacheDir(opts.CacheDir)
	}
	for _, d := range cands {
		a, err := loadArtifact(ctx, fetcher, img, d)
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", d, err))
			continue
		}
		if pin != "" && a.root != pin {
			errs = append(errs, fmt.Sprintf("%s has root hash %s", d, a.root))
			continue
		}
		ii, err := a.open(ctx, src, img, opts)
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", d, err))
			continue
		}
		ii.ArtifactFetched = fetcher.fetched.Load()
		return ii, nil
	}
	want := ""
	if pin != "" {
		want = " with root hash " + pin
	}
	return nil, fmt.Errorf("oci: %s: no usable index%s (%s)", img.source, want, strings.Join(errs, "; "))
}

// indexCandidates lists the index artifacts whose subject is the
// manifest, the newest first.
func indexCandidates(ctx context.Context, src source, subject v1.Hash, kc authn.Keychain) ([]v1.Hash, error) {
	var out []v1.Descriptor
	switch s := src.(type) {
	case *registrySource:
		if kc == nil {
			kc = authn.DefaultKeychain
		}
		// go-containerregistry asks the referrers API and falls back to
		// the sha256-<hex> tag where the registry has none.
		idx, err := remote.Referrers(s.ref.Context().Digest(subject.String()), remote.WithContext(ctx),
			remote.WithAuthFromKeychain(kc), remote.WithFilter("artifactType", IndexArtifactType))
		if err != nil {
			return nil, err
		}
		im, err := idx.IndexManifest()
		if err != nil {
			return nil, err
		}
		for _, d := range im.Manifests {
			if d.ArtifactType == IndexArtifactType {
				out = append(out, d)
			}
		}
	case *layoutSource:
		ii, err := s.path.ImageIndex()
		if err != nil {
			return nil, err
		}
		im, err := ii.IndexManifest()
		if err != nil {
			return nil, err
		}
		for _, d := range im.Manifests {
			if d.ArtifactType == IndexArtifactType && d.Annotations[subjectAnnotation] == subject.String() {
				out = append(out, d)
			}
		}
	default:
		return nil, fmt.Errorf("cannot look for an index in %s", src.canonical())
	}
	// By creation time (RFC 3339 in UTC sorts as text), newest first; the
	// layout's list, and the referrers API's, add the newest last, so
	// among equals (indexes older than the annotation) later wins.
	slices.Reverse(out)
	sort.SliceStable(out, func(i, j int) bool {
		return out[i].Annotations[createdAnnotation] > out[j].Annotations[createdAnnotation]
	})
	ds := make([]v1.Hash, len(out))
	for i, d := range out {
		ds[i] = d.Digest
	}
	return ds, nil
}

// artifact is an index artifact fetched and checked against itself and
// the image.
type artifact struct {
	digest    v1.Hash
	cfg       IndexConfig
	bootstrap []byte
	level1    []byte
	tables    map[int]*gzran.Index   // artifact layer → gzip table (windows apart)
	windows   map[int]v1.Descriptor  // artifact layer → the blob of a table's windows
	zstd      map[int]*zstdran.Index // artifact layer → zstd table
	root      string
}

// IndexArtifactCacheDir is where OpenIndexed keeps index artifacts under
// a cache directory: one file per manifest or blob, named by its sha256.
func IndexArtifactCacheDir(cacheRoot string) string {
	return filepath.Join(cacheRoot, "index-artifacts", "sha256")
}

// artifactFetcher reads an artifact's manifest and blobs from the cache
// directory when they are there (and whole: their digest is checked),
// else from the source, keeping a copy.
type artifactFetcher struct {
	src     source
	dir     string // IndexArtifactCacheDir, or "" for no cache
	fetched atomic.Int64

	mu      sync.Mutex
	fetches map[v1.Hash]*blobFetch // started by fetchAhead
}

// blobFetch is a blob read started ahead of its use.
type blobFetch struct {
	done chan struct{}
	b    []byte
	err  error
}

// fetchAhead starts reading the blobs of ds at once (a few at a time), so
// that the reads that follow, one after another with checks between
// them, do not each wait a round trip: on a registry far away the start
// of a lazily read image is mostly round trips.
func (f *artifactFetcher) fetchAhead(ctx context.Context, ds []v1.Descriptor, limit int64) {
	sem := make(chan struct{}, 4)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fetches == nil {
		f.fetches = map[v1.Hash]*blobFetch{}
	}
	for _, d := range ds {
		if f.fetches[d.Digest] != nil {
			continue
		}
		bf := &blobFetch{done: make(chan struct{})}
		f.fetches[d.Digest] = bf
		go func() {
			defer close(bf.done)
			select {
			case sem <- struct{}{}:
				defer func() { <-sem }()
			case <-ctx.Done():
				bf.err = ctx.Err()
				return
			}
			bf.b, bf.err = f.fetch(ctx, d, limit)
		}()
	}
}

// cached returns the cached bytes of d, or nil.
func (f *artifactFetcher) cached(d v1.Hash, limit int64) []byte {
	if f.dir == "" || d.Algorithm != "sha256" {
		return nil
	}
	file, err := os.Open(filepath.Join(f.dir, d.Hex))
	if err != nil {
		return nil
	}
	defer file.Close()
	b, err := readLimited(file, limit)
	if err != nil || sha256Hash(b) != d {
		return nil // damaged or foreign: fetched again and replaced
	}
	return b
}

// keep stores b, whose digest was checked, as d (failures only cost a
// download next time).
func (f *artifactFetcher) keep(d v1.Hash, b []byte) {
	if f.dir == "" || d.Algorithm != "sha256" {
		return
	}
	if err := os.MkdirAll(f.dir, 0o750); err == nil {
		_ = atomicfile.WriteFile(filepath.Join(f.dir, d.Hex), b, 0o640)
	}
}

func (f *artifactFetcher) manifest(ctx context.Context, d v1.Hash) ([]byte, error) {
	if b := f.cached(d, DefaultMaxManifestSize); b != nil {
		return b, nil
	}
	raw, _, err := f.src.manifest(ctx, d, DefaultMaxManifestSize)
	if err != nil {
		return nil, err
	}
	f.fetched.Add(int64(len(raw)))
	if got := sha256Hash(raw); got != d {
		return nil, fmt.Errorf("manifest content has digest %s", got)
	}
	f.keep(d, raw)
	return raw, nil
}

// blob reads a blob of at most limit bytes and checks its digest (the
// read fetchAhead started, when it succeeded with the same limit).
func (f *artifactFetcher) blob(ctx context.Context, d v1.Descriptor, limit int64) ([]byte, error) {
	f.mu.Lock()
	bf := f.fetches[d.Digest]
	f.mu.Unlock()
	if bf != nil {
		select {
		case <-bf.done:
			if bf.err == nil && int64(len(bf.b)) <= limit {
				return bf.b, nil
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return f.fetch(ctx, d, limit)
}

func (f *artifactFetcher) fetch(ctx context.Context, d v1.Descriptor, limit int64) ([]byte, error) {
	if d.Size >= 0 && d.Size <= limit {
		if b := f.cached(d.Digest, d.Size); b != nil && int64(len(b)) == d.Size {
			return b, nil
		}
	}
	b, err := fetchBlob(ctx, f.src, d, limit)
	if err != nil {
		return nil, err
	}
	f.fetched.Add(int64(len(b)))
	f.keep(d.Digest, b)
	return b, nil
}

// fetchBlob reads a blob of at most limit bytes and checks its digest.
func fetchBlob(ctx context.Context, src source, d v1.Descriptor, limit int64) ([]byte, error) {
	if d.Size < 0 || d.Size > limit {
		return nil, fmt.Errorf("blob %s of %d bytes (at most %d)", d.Digest, d.Size, limit)
	}
	rc, err := src.blob(ctx, d.Digest)
	if err != nil {
		return nil, fmt.Errorf("blob %s: %w", d.Digest, err)
	}
	defer rc.Close()
	b, err := readLimited(rc, d.Size)
	if err != nil {
		return nil, fmt.Errorf("blob %s: %w", d.Digest, err)
	}
	if got := sha256Hash(b); got != d.Digest || int64(len(b)) != d.Size {
		return nil, fmt.Errorf("blob %s: content has digest %s and %d bytes (descriptor: %d): changed", d.Digest, got, len(b), d.Size)
	}
	return b, nil
}

func loadArtifact(ctx context.Context, src *artifactFetcher, img *image, d v1.Hash) (*artifact, error) {
	// The reads fetchAhead starts end with it: an artifact refused half
	// way leaves none running while the next one is tried.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	raw, err := src.manifest(ctx, d)
	if err != nil {
		return nil, err
	}
	var m struct {
		v1.Manifest
		ArtifactType string `json:"artifactType"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	if m.ArtifactType != IndexArtifactType || m.Subject == nil || m.Subject.Digest != img.manifestDigest ||
		string(m.Config.MediaType) != IndexConfigType || len(m.Layers) < 2 ||
		string(m.Layers[0].MediaType) != IndexBootstrapType || string(m.Layers[1].MediaType) != IndexVerityType {
		return nil, errors.New("not an index artifact of this image")
	}
	a := &artifact{digest: d, tables: map[int]*gzran.Index{}, windows: map[int]v1.Descriptor{}, zstd: map[int]*zstdran.Index{}}
	// Everything but the windows (read by range later) is needed.
	var ahead []v1.Descriptor
	for _, l := range m.Layers {
		if string(l.MediaType) != IndexGzipWindowType {
			ahead = append(ahead, l)
		}
	}
	src.fetchAhead(ctx, []v1.Descriptor{m.Config}, maxIndexConfig)
	src.fetchAhead(ctx, ahead, maxIndexBlob)
	rawCfg, err := src.blob(ctx, m.Config, maxIndexConfig)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(rawCfg, &a.cfg); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if a.cfg.Manifest != img.manifestDigest.String() {
		return nil, fmt.Errorf("config names manifest %s", a.cfg.Manifest)
	}
	if a.cfg.Format != indexFormat {
		return nil, fmt.Errorf("index format %d, this rafsnbd reads %d (run rafsnbd index again)", a.cfg.Format, indexFormat)
	}
	zboot, err := src.blob(ctx, m.Layers[0], maxIndexBlob)
	if err != nil {
		return nil, err
	}
	dec, err := zstd.NewReader(bytes.NewReader(zboot), zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxIndexBootstrap))
	if err != nil {
		return nil, err
	}
	a.bootstrap, err = readLimited(dec, maxIndexBootstrap)
	dec.Close()
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	if a.level1, err = src.blob(ctx, m.Layers[1], maxIndexBlob); err != nil {
		return nil, err
	}
	fill := make([]byte, sha256.Size)
	switch a.cfg.Verity.Compat {
	case verity.Standard.String():
	case verity.NydusCompat.String():
		f := sha256.Sum256(make([]byte, verityHashBlockSize))
		fill = f[:]
	default:
		return nil, fmt.Errorf("verity compat %q", a.cfg.Verity.Compat)
	}
	if len(a.level1) == 0 || len(a.level1)%sha256.Size != 0 {
		return nil, fmt.Errorf("%d bytes of level-1 digests", len(a.level1))
	}
	// The root is recomputed here: the config's is only a label.
	a.root = hex.EncodeToString(rootOf(a.level1, fill))
	if a.root != a.cfg.Verity.RootHash {
		return nil, fmt.Errorf("its level-1 digests make root hash %s, its config says %s", a.root, a.cfg.Verity.RootHash)
	}
	if len(a.cfg.Layers) != len(img.layers) {
		return nil, fmt.Errorf("%d layers, the image has %d", len(a.cfg.Layers), len(img.layers))
	}
	for i, l := range a.cfg.Layers {
		il := img.layers[i]
		if l.Digest != il.digest.String() || l.DiffID != il.diffID.String() || l.Size != il.size || l.MediaType != string(il.mediaType) {
			return nil, fmt.Errorf("layer %d is %s (%s), the image's is %s (%s)", i, l.Digest, l.DiffID, il.digest, il.diffID)
		}
		switch {
		case l.MediaType == string(types.OCILayerZStd):
			idx := new(zstdran.Index)
			if l.Windows != -1 {
				return nil, fmt.Errorf("layer %d: a zstd table has no windows (%d)", i, l.Windows)
			}
			if err := loadTable(ctx, src, m.Layers, i, l, IndexZstdTableType, idx, func() (int64, int64) { return idx.CompressedSize, idx.UncompressedSize }); err != nil {
				return nil, err
			}
			a.zstd[l.Table] = idx
		case l.Table >= 0:
			idx := new(gzran.Index)
			if l.Windows < 2 || l.Windows >= len(m.Layers) || string(m.Layers[l.Windows].MediaType) != IndexGzipWindowType {
				return nil, fmt.Errorf("layer %d: the windows of its checkpoint table (%d) are not in the artifact", i, l.Windows)
			}
			if err := loadTable(ctx, src, m.Layers, i, l, IndexGzipTableType, idx, func() (int64, int64) { return idx.CompressedSize, idx.UncompressedSize }); err != nil {
				return nil, err
			}
			if w := m.Layers[l.Windows]; w.Size != idx.WindowsSize() {
				return nil, fmt.Errorf("layer %d: its windows blob has %d bytes, its table says %d", i, w.Size, idx.WindowsSize())
			}
			a.tables[l.Table], a.windows[l.Table] = idx, m.Layers[l.Windows]
		}
	}
	return a, nil
}

// loadTable reads layer i's checkpoint table (the artifact layer l.Table,
// of media type mt) into table, and checks that sizes, its compressed and
// uncompressed sizes once decoded, are the layer's.
func loadTable(ctx context.Context, src *artifactFetcher, blobs []v1.Descriptor, i int, l IndexLayer, mt string,
	table encoding.BinaryUnmarshaler, sizes func() (compressed, uncompressed int64)) error {
	if l.Table < 2 || l.Table >= len(blobs) || string(blobs[l.Table].MediaType) != mt {
		return fmt.Errorf("layer %d: its checkpoint table (%d, %s) is not in the artifact", i, l.Table, mt)
	}
	raw, err := src.blob(ctx, blobs[l.Table], maxIndexBlob)
	if err != nil {
		return err
	}
	if err := table.UnmarshalBinary(raw); err != nil {
		return fmt.Errorf("layer %d: %w", i, err)
	}
	if c, u := sizes(); c != l.Size || u != l.UncompressedSize {
		return fmt.Errorf("layer %d: checkpoint table for %d/%d bytes, the layer has %d/%d", i, c, u, l.Size, l.UncompressedSize)
	}
	return nil
}

// open builds the layers' backends and the verity checker.
func (a *artifact) open(ctx context.Context, src source, img *image, opts OpenIndexOptions) (*IndexedImage, error) {
	ri, err := rafs.NewImage(bytes.NewReader(a.bootstrap), int64(len(a.bootstrap)))
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	defer ri.Close()
	if ri.BlockSize != verityDataBlockSize {
		return nil, fmt.Errorf("bootstrap: %d-byte blocks, not a tarfs image", ri.BlockSize)
	}
	var raws blobcache.Store
	ii := &IndexedImage{Ref: img.source, ManifestDigest: img.manifestDigest.String(), ArtifactDigest: a.digest.String(),
		RootHash: a.root, Bootstrap: a.bootstrap, Layers: a.cfg.Layers}
	if a.cfg.Prefetch != nil {
		ii.Prefetch = *a.cfg.Prefetch
	}
	if raws, ii.stats, err = layerStore(src, opts.Insecure, opts.Keychain); err != nil {
		return nil, err
	}
	byDiff := map[string]*IndexLayer{}
	for i := range a.cfg.Layers {
		byDiff[strings.TrimPrefix(a.cfg.Layers[i].DiffID, "sha256:")] = &a.cfg.Layers[i]
	}
	var exts []blobcache.VerityExtent
	closeAll := func() {
		for _, e := range exts {
			if c, ok := e.Raw.(io.Closer); ok {
				c.Close()
			}
		}
	}
	end := uint64(len(a.bootstrap)) / verityDataBlockSize
	for i := range ri.Blobs {
		e := &ri.Blobs[i]
		l := byDiff[e.ID()]
		if l == nil || !e.IsTarfs() || uint64(l.UncompressedSize) != e.UncompressedSize || e.UncompressedSize%verityDataBlockSize != 0 {
			closeAll()
			return nil, fmt.Errorf("bootstrap: blob %d (%s) is not a layer of the index", i, e.ID())
		}
		raw, err := raws.Open(ctx, strings.TrimPrefix(l.Digest, "sha256:"))
		if err != nil {
			closeAll()
			return nil, err
		}
		if zt := a.zstd[l.Table]; zt != nil {
			zl, err := blobcache.NewZstdLayer(raw, zt)
			if err != nil {
				if c, ok := raw.(io.Closer); ok {
					c.Close()
				}
				closeAll()
				return nil, fmt.Errorf("layer %s: %w", l.Digest, err)
			}
			raw = zl
		} else if l.Table >= 0 {
			// The windows are the artifact's, in the image's repository
			// (or layout) like the layers.
			windows, err := raws.Open(ctx, a.windows[l.Table].Digest.Hex)
			var gl *blobcache.SpanLayer
			if err == nil {
				gl, err = blobcache.NewGzipLayer(raw, windows, a.tables[l.Table])
			}
			if err != nil {
				for _, b := range []blobcache.Backend{raw, windows} {
					if c, ok := b.(io.Closer); ok {
						c.Close()
					}
				}
				closeAll()
				return nil, err
			}
			raw = gl
		} else if l.Size != l.UncompressedSize {
			closeAll()
			return nil, fmt.Errorf("layer %s: uncompressed, but %d stored bytes for %d", l.Digest, l.Size, l.UncompressedSize)
		}
		addr := uint64(ri.DeviceSlots[i].MappedBlkAddr)
		exts = append(exts, blobcache.VerityExtent{ID: e.ID(), Offset: int64(addr * verityDataBlockSize), Length: int64(e.UncompressedSize), Raw: raw})
		end = max(end, addr+e.UncompressedSize/verityDataBlockSize)
	}
	if end != a.cfg.Verity.DataBlocks {
		closeAll()
		return nil, fmt.Errorf("the device has %d blocks, its verity tree %d", end, a.cfg.Verity.DataBlocks)
	}
	ii.Verity, err = blobcache.NewDeviceVerity(a.level1, a.cfg.Verity.Compat == verity.NydusCompat.String(),
		int64(end*verityDataBlockSize), a.bootstrap, exts, opts.UnitSize)
	if err != nil {
		closeAll()
		return nil, err
	}
	return ii, nil
}
