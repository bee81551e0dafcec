package oci

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
)

// CachedImage is one converted image found in a cache directory.
type CachedImage struct {
	Info ImageInfo
	// Bytes is the disk usage of the files only this image uses: its
	// bootstrap, and its layers and disks that no other image shares.
	Bytes int64
	// Err is set when image.json cannot be read; Info then holds only the
	// manifest digest.
	Err error
}

// CachedFile is a file of the cache that is not an image's own: a layer
// tar, a layer bootstrap, an exported disk, a lazy index artifact, or a
// leftover of an interrupted conversion.
type CachedFile struct {
	Path   string // relative to the cache directory
	Kind   string // "layer tar", "layer bootstrap", "image disk", "layer disk", "index artifact", "leftover"
	Bytes  int64  // disk usage
	Images int    // how many converted images use it
}

// CacheContents is what 'rafsnbd convert' keeps in a cache directory.
type CacheContents struct {
	Images []CachedImage
	Files  []CachedFile
	Bytes  int64 // disk usage of all of it
}

// ListCache lists the converted images and their files in cacheDir. A
// directory without a conversion cache (or none at all) lists empty; it is
// not created.
func ListCache(cacheDir string) (*CacheContents, error) {
	abs, err := filepath.Abs(cacheDir)
	if err != nil {
		return nil, err
	}
	c := &cache{dir: abs}
	images, err := c.images()
	if err != nil {
		return nil, err
	}
	files, err := c.files(images)
	if err != nil {
		return nil, err
	}
	cc := &CacheContents{Images: images, Files: files}
	for i := range cc.Images {
		im := &cc.Images[i]
		im.Bytes = duTree(c.imageDir(hexOf(im.Info.ManifestDigest)))
		for _, f := range files {
			if f.Images == 1 && c.usedBy(&im.Info, f.Path) {
				im.Bytes += f.Bytes
			}
		}
		cc.Bytes += duTree(c.imageDir(hexOf(im.Info.ManifestDigest)))
	}
	for _, f := range files {
		cc.Bytes += f.Bytes
	}
	return cc, nil
}

// images reads every images/<hex>/image.json.
func (c *cache) images() ([]CachedImage, error) {
	ents, err := os.ReadDir(filepath.Join(c.dir, "images"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("oci: cache: %w", err)
	}
	var out []CachedImage
	for _, e := range ents {
		if !e.IsDir() || len(e.Name()) != 64 || !isHex(e.Name()) {
			continue
		}
		im := CachedImage{Info: ImageInfo{ManifestDigest: "sha256:" + e.Name()}}
		b, err := os.ReadFile(filepath.Join(c.imageDir(e.Name()), "image.json"))
		if err == nil {
			err = json.Unmarshal(b, &im.Info)
		}
		if err != nil {
			im.Err = fmt.Errorf("image.json: %w", err)
		}
		out = append(out, im)
	}
	return out, nil
}

// usedBy reports whether image info uses the cache file rel.
func (c *cache) usedBy(info *ImageInfo, rel string) bool {
	dir, name := filepath.Split(rel)
	hex, _, _ := strings.Cut(name, ".")
	switch filepath.Clean(dir) {
	case "blobs":
		for _, ex := range info.Exports {
			if filepath.Clean(ex.Path) == rel {
				return true
			}
		}
		if strings.HasSuffix(name, ".disk") {
			return false
		}
	case "layers":
	default:
		return false
	}
	return slices.ContainsFunc(info.Layers, func(l LayerInfo) bool { return hexOf(l.DiffID) == hex })
}

// files lists blobs/ and layers/, with how many images use each file.
func (c *cache) files(images []CachedImage) ([]CachedFile, error) {
	var out []CachedFile
	for _, sub := range []string{"blobs", "layers", "staging", indexArtifactDir} {
		ents, err := os.ReadDir(filepath.Join(c.dir, sub))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("oci: cache: %w", err)
		}
		for _, e := range ents {
			rel := filepath.Join(sub, e.Name())
			f := CachedFile{Path: rel, Kind: fileKind(sub, e.Name()), Bytes: duTree(filepath.Join(c.dir, rel))}
			if f.Kind == "" {
				continue // not ours
			}
			for i := range images {
				if images[i].Err == nil && c.usedBy(&images[i].Info, rel) {
					f.Images++
				}
			}
			out = append(out, f)
		}
	}
	return out, nil
}

// fileKind names what a file of the cache is, or "" for a name convert
// never writes.
func fileKind(sub, name string) string {
	if sub == "staging" || atomicfile.IsTemp(name) {
		return "leftover"
	}
	if sub == indexArtifactDir {
		if len(name) == 64 && isHex(name) {
			return "index artifact"
		}
		return ""
	}
	hex, ext, _ := strings.Cut(name, ".")
	if len(hex) != 64 || !isHex(hex) {
		return ""
	}
	switch {
	case sub == "blobs" && ext == "":
		return "layer tar"
	case sub == "layers" && ext == "boot":
		return "layer bootstrap"
	case sub == "blobs" && ext == "image.disk":
		return "image disk"
	case sub == "blobs" && ext == "layer.disk":
		return "layer disk"
	}
	return ""
}

// duTree is the disk usage of a file or a directory tree, in bytes.
func duTree(path string) int64 {
	var n int64
	filepath.WalkDir(path, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if info, err := d.Info(); err == nil {
			if st, ok := info.Sys().(*unix.Stat_t); ok {
				n += st.Blocks * 512
			} else {
				n += info.Size()
			}
		}
		return nil
	})
	return n
}

// GCOptions say which converted images GC removes; leftovers of
// interrupted conversions and files no image uses are removed always.
type GCOptions struct {
	All       bool          // every image
	OlderThan time.Duration // images converted longer ago than this (0: none)
}

// GC removes converted images from cacheDir as opts say, then every file no
// remaining image uses, and leftovers of interrupted conversions. It
// refuses to run while a conversion is running in the same cache (it would
// remove what that conversion has not yet published). Images being served
// stay readable: their open files live until closed.
func GC(ctx context.Context, cacheDir string, opts GCOptions) (removed []CachedImage, freed int64, err error) {
	cc, err := ListCache(cacheDir)
	if err != nil || (len(cc.Images) == 0 && len(cc.Files) == 0) {
		return nil, 0, err
	}
	abs, _ := filepath.Abs(cacheDir)
	c := &cache{dir: abs}
	release, err := c.holdExclusive()
	if err != nil {
		return nil, 0, err
	}
	defer release()
	if cc, err = ListCache(cacheDir); err != nil { // again, now that nothing changes it
		return nil, 0, err
	}
	var keep []CachedImage
	for _, im := range cc.Images {
		old := opts.OlderThan > 0 && time.Since(im.Info.Converted) > opts.OlderThan
		if opts.All || old || im.Err != nil {
			dir := c.imageDir(hexOf(im.Info.ManifestDigest))
			n := duTree(dir)
			if err := os.RemoveAll(dir); err != nil {
				return removed, freed, fmt.Errorf("oci: cache: %w", err)
			}
			removed, freed = append(removed, im), freed+n
			continue
		}
		keep = append(keep, im)
	}
	for _, f := range cc.Files {
		used := slices.ContainsFunc(keep, func(im CachedImage) bool { return c.usedBy(&im.Info, f.Path) })
		if f.Kind == "index artifact" {
			// Kept for lazily served images, which have no record here:
			// removed by --all, or by age (since it was fetched).
			st, err := os.Stat(filepath.Join(c.dir, f.Path))
			used = !opts.All && (opts.OlderThan <= 0 || err == nil && time.Since(st.ModTime()) <= opts.OlderThan)
		}
		if used {
			continue
		}
		if err := os.RemoveAll(filepath.Join(c.dir, f.Path)); err != nil {
			return removed, freed, fmt.Errorf("oci: cache: %w", err)
		}
		freed += f.Bytes
	}
	for _, sub := range []string{"blobs", "layers", "images", indexArtifactDir} {
		if err := atomicfile.SyncDir(filepath.Join(c.dir, sub)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return removed, freed, err
		}
	}
	return removed, freed, nil
}

// indexArtifactDir holds the index artifacts of lazily served images
// (IndexArtifactCacheDir), by digest, relative to the cache.
var indexArtifactDir = filepath.Join("index-artifacts", "sha256")

// useLockName is held shared by every conversion and exclusively by GC.
const useLockName = "use.lock"

// holdShared takes the cache's use lock shared, waiting while GC runs.
func (c *cache) holdShared(ctx context.Context) (release func(), err error) {
	return c.flockUse(ctx, unix.LOCK_SH, true)
}

// holdExclusive takes the use lock exclusively, or fails at once when a
// conversion holds it.
func (c *cache) holdExclusive() (release func(), err error) {
	release, err = c.flockUse(context.Background(), unix.LOCK_EX, false)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, fmt.Errorf("oci: cache %s: a conversion is running; collect garbage when it has ended", c.dir)
	}
	return release, err
}

// flockUse takes the use lock, waiting for it if wait is set.
func (c *cache) flockUse(ctx context.Context, how int, wait bool) (func(), error) {
	if err := os.MkdirAll(filepath.Join(c.dir, "locks"), cacheDirMode); err != nil {
		return nil, fmt.Errorf("oci: cache: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(c.dir, "locks", useLockName), os.O_RDWR|os.O_CREATE, cacheFileMode)
	if err != nil {
		return nil, fmt.Errorf("oci: cache: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !wait || !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, err
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(lockPoll):
		}
	}
}
