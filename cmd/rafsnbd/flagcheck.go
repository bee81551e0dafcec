package main

import (
	"github.com/urfave/cli/v3"
)

// checkImageFlags refuses image flag combinations that would otherwise be
// accepted and then ignored, before any work starts. disksOK says whether
// the command serves --disk files too.
func checkImageFlags(c *cli.Command, disksOK bool) error {
	has := func(name string) bool { return c.IsSet(name) }
	if !has("bootstrap") && !has("image") && !(disksOK && has("disk")) {
		if disksOK {
			return usagef(c, "no image: give -B BOOTSTRAP (with -D BLOBDIR or --registry REPO), --image REF, or --disk FILE")
		}
		return usagef(c, "no image: give -B BOOTSTRAP (with -D BLOBDIR or --registry REPO), or --image REF")
	}
	if has("blob-dir") && has("registry") {
		return usagef(c, "-D and --registry both say where the blobs are: give one")
	}
	if has("image") && (has("bootstrap") || has("blob-dir") || has("registry") || has("backend")) {
		return usagef(c, "--image names the bootstrap and blobs itself: drop -B, -D, --registry and --backend")
	}
	if has("registry") && !has("cache-dir") {
		return usagef(c, "--registry reads blobs lazily into a cache: give --cache-dir DIR too")
	}
	// --image may be read lazily from its registry (issue 12), so it takes --insecure too.
	if has("insecure") && !has("registry") && !has("backend") && !has("image") {
		return usagef(c, "--insecure is for a --registry blob source; there is none")
	}
	if has("root-hash") && !has("image") {
		return usagef(c, "--root-hash pins the verity root of an --image read through its index: give --image REF")
	}
	for _, f := range []string{"prefetch", "prefetch-all"} {
		if has(f) && !has("cache-dir") {
			return usagef(c, "--%s fills the blob cache: give --cache-dir DIR too (without a cache every read goes to the blobs directly)", f)
		}
	}
	return nil
}
