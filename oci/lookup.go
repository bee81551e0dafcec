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

	prefix, isDigest, err := digestPrefix(refOrDigest)
	if err != nil {
		return nil, fmt.Errorf("oci: %s: %w", refOrDigest, err)
	}
	var match func(dir string, rec *ImageInfo) bool
	if isDigest {
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
		if !isDigest && isHex(refOrDigest) {
			// "abc123" may be a repository name or a digest prefix that
			// is too short; say both.
			return nil, fmt.Errorf("oci: %s: no converted image of that reference in %s, and a manifest digest prefix needs at least %d hex digits",
				refOrDigest, cacheDir, minDigestPrefix)
		}
		return nil, fmt.Errorf("oci: %s: no converted image in %s (run rafsnbd convert first)", refOrDigest, cacheDir)
	}
	if isDigest && len(matched) > 1 {
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

// minDigestPrefix is the shortest manifest digest prefix a lookup takes
// (docker's short ids have 12 hex digits; fewer collide too easily).
const minDigestPrefix = 12

// digestPrefix recognizes a manifest digest or a prefix of its hex:
// "sha256:" and 12 to 64 hex digits, or 12 to 64 hex digits alone.
// Anything else after "sha256:" is an error; other strings are references.
func digestPrefix(s string) (prefix string, ok bool, err error) {
	h, tagged := strings.CutPrefix(s, "sha256:")
	switch {
	case len(h) >= minDigestPrefix && len(h) <= 64 && isHex(h):
		return h, true, nil
	case tagged && len(h) < minDigestPrefix && isHex(h):
		return "", false, fmt.Errorf("give at least %d hex digits of the manifest digest", minDigestPrefix)
	case tagged:
		return "", false, fmt.Errorf("not a manifest digest (want sha256: and %d to 64 hex digits)", minDigestPrefix)
	}
	return "", false, nil
}

func isHex(s string) bool { return s != "" && strings.Trim(s, "0123456789abcdef") == "" }
