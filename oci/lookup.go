package oci

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ResolveImage finds a converted image in the cache and returns its merged
// bootstrap and the directory of its blobs, ready for
// blockdev.Open(ctx, bootstrapPath, blockdev.LocalBlobs{Dir: blobDir}).
//
// refOrDigest is either the manifest digest ("sha256:<hex>", or at least
// 12 leading hex digits of it) or the reference the image was converted
// from, in any spelling that names the same image ("alpine" matches
// "index.docker.io/library/alpine:latest", "oci:./dir:tag" the absolute
// layout path). When several conversions of a reference exist (its tag
// moved), the latest wins. It fails unless the bootstrap and every layer
// tar are in place.
func ResolveImage(cacheDir, refOrDigest string) (bootstrapPath, blobDir string, err error) {
	rec, err := LookupImage(cacheDir, refOrDigest)
	if err != nil {
		return "", "", err
	}
	abs, err := filepath.Abs(cacheDir)
	if err != nil {
		return "", "", err
	}
	return filepath.Join(abs, rec.Bootstrap), filepath.Join(abs, rec.BlobDir), nil
}

// LookupImage returns the record of a converted image; see ResolveImage
// for how refOrDigest is matched.
func LookupImage(cacheDir, refOrDigest string) (*ImageInfo, error) {
	abs, err := filepath.Abs(cacheDir)
	if err != nil {
		return nil, err
	}
	images := filepath.Join(abs, "images")
	ents, err := os.ReadDir(images)
	if err != nil {
		return nil, fmt.Errorf("oci: cache %s: %w", cacheDir, err)
	}

	var match func(dir string, rec *ImageInfo) bool
	if prefix, ok := digestPrefix(refOrDigest); ok {
		match = func(dir string, _ *ImageInfo) bool { return strings.HasPrefix(dir, prefix) }
	} else {
		want, err := CanonicalRef(refOrDigest, false)
		if err != nil {
			return nil, err
		}
		match = func(_ string, rec *ImageInfo) bool { return rec.Ref == want }
	}

	var best *ImageInfo
	var matched []string
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		rec, err := readRecord(filepath.Join(images, e.Name(), "image.json"))
		if err != nil || hexOf(rec.ManifestDigest) != e.Name() || !match(e.Name(), rec) {
			continue // not (yet) converted, or another image
		}
		matched = append(matched, rec.ManifestDigest)
		if best == nil || rec.Converted.After(best.Converted) {
			best = rec
		}
	}
	if best == nil {
		return nil, fmt.Errorf("oci: %s: no converted image in %s (run rafsnbd convert first)", refOrDigest, cacheDir)
	}
	if _, ok := digestPrefix(refOrDigest); ok && len(matched) > 1 {
		return nil, fmt.Errorf("oci: %s: ambiguous, matches %s", refOrDigest, strings.Join(matched, ", "))
	}
	if err := best.checkFiles(abs); err != nil {
		return nil, fmt.Errorf("oci: %s: %w", refOrDigest, err)
	}
	return best, nil
}

// checkFiles reports what of a converted image is no longer in cacheDir as
// it was recorded: the bootstrap, or a layer tar (gone or resized).
func (rec *ImageInfo) checkFiles(cacheDir string) error {
	if st, err := os.Stat(filepath.Join(cacheDir, rec.Bootstrap)); err != nil || !st.Mode().IsRegular() {
		return fmt.Errorf("bootstrap %s is missing", rec.Bootstrap)
	}
	for _, l := range rec.Layers {
		p := filepath.Join(cacheDir, rec.BlobDir, hexOf(l.DiffID))
		if st, err := os.Stat(p); err != nil || st.Size() != l.TarSize {
			return fmt.Errorf("layer tar %s is missing or has changed", p)
		}
	}
	return nil
}

// digestPrefix recognizes a manifest digest or a prefix of its hex.
func digestPrefix(s string) (string, bool) {
	h, ok := strings.CutPrefix(s, "sha256:")
	if !ok && len(s) < 12 {
		return "", false
	}
	if h == "" || len(h) > 64 || strings.Trim(h, "0123456789abcdef") != "" {
		return "", false
	}
	return h, true
}
