"""S3 access through boto3's standard configuration, and the matching pyarrow filesystem.

Everything comes from where the AWS tools look: `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`,
`AWS_PROFILE` and the shared config files, environment credentials, instance roles. Only the
endpoint and region travel to Ray workers; each worker resolves its own credentials, so secrets are
never serialised into tasks, logs or run records.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from twig_batch.errors import OutputError

_CLIENT_ERRORS_ABOUT_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                                    "InvalidToken", "AuthorizationHeaderMalformed", "AccessDenied", "403"}


@dataclass(frozen=True, slots=True)
class S3Location:
    bucket: str
    key: str  # no leading slash; may be empty (bucket root)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"


def is_s3_uri(text: str) -> bool:
    return text.startswith("s3://")


def parse_s3_uri(uri: str, error=ValueError) -> S3Location:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise error(f"{uri!r} is not an s3://bucket/prefix address")
    if "@" in parts.netloc or parts.query or parts.fragment:
        # Credentials never belong in an address: they would end up in run.json and logs.
        raise error("an s3:// address holds only the bucket and prefix; configure credentials the AWS way "
                    "(environment, AWS_PROFILE, instance role)")
    return S3Location(parts.netloc, parts.path.lstrip("/"))


@dataclass(frozen=True, slots=True)
class S3Endpoint:
    """The non-secret part of the S3 configuration, resolved once on the driver."""

    url: str | None
    region: str | None

    @classmethod
    def resolve(cls) -> "S3Endpoint":
        client = new_client(cls(None, None))
        url = client.meta.endpoint_url
        custom = url if url and "amazonaws.com" not in url else None
        return cls(custom, client.meta.region_name)


def new_client(endpoint: S3Endpoint):
    import boto3
    from botocore.config import Config

    # botocore's standard mode retries throttling, 5xx and dropped connections quickly (3 calls, short
    # jittered waits, a shared retry budget); `retry.call_with_retries` adds longer waits above it.
    config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=60)
    kwargs = {"endpoint_url": endpoint.url} if endpoint.url else {}
    if endpoint.region:
        kwargs["region_name"] = endpoint.region
    return boto3.session.Session().client("s3", config=config, **kwargs)


def arrow_filesystem(endpoint: S3Endpoint):
    """pyarrow's S3 filesystem pointed where boto3 points; credentials come from each process's own chain."""
    from pyarrow import fs

    kwargs: dict = {"region": endpoint.region or "us-east-1"}
    if endpoint.url:
        parts = urlsplit(endpoint.url)
        kwargs.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme or "https")
    return fs.S3FileSystem(**kwargs)


def explain_s3_error(exc: Exception, what: str, error=OutputError) -> Exception:
    """One plain sentence for the S3 failures a user can fix (bucket, credentials, endpoint)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return error(f"{what}: no usable AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                     "AWS_PROFILE, or run where an instance role is available)")
    if isinstance(exc, EndpointConnectionError):
        return error(f"{what}: cannot reach the S3 endpoint ({exc})")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):
            return error(f"{what}: the bucket does not exist")
        if code in _CLIENT_ERRORS_ABOUT_CREDENTIALS:
            return error(f"{what}: the AWS credentials were refused ({code}); check the access key, secret "
                         "and permissions")
        return error(f"{what}: S3 said {code or 'error'}: {exc.response.get('Error', {}).get('Message', exc)}")
    return error(f"{what}: {type(exc).__name__}: {exc}")
