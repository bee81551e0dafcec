package regclient

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
)

// DockerPrefix is skopeo's spelling of a registry reference
// ("docker://host/app:v1"); ParseReference accepts it.
const DockerPrefix = "docker://"

// skopeoTransports are the other transports of containers/image (skopeo,
// podman): none of them names a registry image. "oci:" is left out: it is
// the OCI layout transport, which package oci reads itself.
var skopeoTransports = []string{
	"oci-archive", "docker-archive", "docker-daemon", "containers-storage",
	"dir", "ostree", "sif", "tarball",
}

// SkopeoTransport returns the containers/image transport ref is spelled
// with ("oci-archive" for "oci-archive:/tmp/x.tar"), or "" when ref has
// none of them. "docker://" is not reported: it is a registry reference.
func SkopeoTransport(ref string) string {
	t, rest, ok := strings.Cut(ref, ":")
	if !ok || !slices.Contains(skopeoTransports, t) {
		return ""
	}
	// "dir:5000/app" is a registry host named dir with a port.
	if p, _, _ := strings.Cut(rest, "/"); p != "" && strings.Trim(p, "0123456789") == "" {
		return ""
	}
	return t
}

// ParseReference parses an image reference as docker and skopeo spell it:
// "[docker://][HOST/]REPOSITORY[:TAG|@DIGEST]". insecure allows plain HTTP
// to any registry.
func ParseReference(ref string, insecure bool) (name.Reference, error) {
	if t := SkopeoTransport(ref); t != "" {
		return nil, fmt.Errorf("%q is a %s: reference (skopeo's spelling), not a registry image", ref, t)
	}
	s := strings.TrimPrefix(ref, DockerPrefix)
	var opts []name.Option
	if insecure {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(s, opts...)
	if err != nil {
		return nil, badName(ref, s, err)
	}
	return r, nil
}

// ParseRepository is ParseReference for a repository: a tag or digest is
// allowed and ignored, so that an image reference can be given as is.
func ParseRepository(ref string, insecure bool) (name.Repository, error) {
	r, err := ParseReference(ref, insecure)
	if err != nil {
		return name.Repository{}, err
	}
	return r.Context(), nil
}

// badName words go-containerregistry's parse error without repeating the
// reference, which it appends to every message.
func badName(ref, parsed string, err error) error {
	var bn *name.ErrBadName
	if !errors.As(err, &bn) {
		return fmt.Errorf("image reference %q: %w", ref, err)
	}
	why := strings.TrimSuffix(bn.Error(), ": "+parsed)
	return fmt.Errorf("image reference %q: %s (want [docker://][HOST/]REPOSITORY[:TAG|@sha256:DIGEST])", ref, why)
}
