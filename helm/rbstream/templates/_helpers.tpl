{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "rbstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-rbstream unless the release name already holds the chart name. */}}
{{- define "rbstream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "rbstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "rbstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (consumer | api): pass (dict "ctx" $ "component" "api"). */}}
{{- define "rbstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rbstream.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rbstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rbstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The CPU image, or the GPU one when gpu is true: pass (dict "ctx" $ "gpu" true). */}}
{{- define "rbstream.image" -}}
{{- if .gpu }}
{{- printf "%s:%s" .ctx.Values.image.gpuRepository (default .ctx.Chart.AppVersion .ctx.Values.image.gpuTag) }}
{{- else }}
{{- printf "%s:%s" .ctx.Values.image.repository (default .ctx.Chart.AppVersion .ctx.Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The most consumer replicas: an autoscaler's maximum, capped by the input topic's partitions. */}}
{{- define "rbstream.consumerMaxReplicas" -}}
{{- $max := int .Values.consumer.replicas }}
{{- if .Values.consumer.autoscaling.keda.enabled }}
{{- $max = int .Values.consumer.autoscaling.keda.maxReplicaCount }}
{{- else if .Values.consumer.autoscaling.hpa.enabled }}
{{- $max = int .Values.consumer.autoscaling.hpa.maxReplicas }}
{{- end }}
{{- min $max (int .Values.kafka.inputTopicPartitions) }}
{{- end }}

{{/* Settings both commands read: librdkafka security settings that hold no secret. */}}
{{- define "rbstream.kafkaSettings" -}}
{{- $kafka := dict "security.protocol" .Values.kafka.securityProtocol }}
{{- with .Values.kafka.sasl.mechanism }}
{{- $_ := set $kafka "sasl.mechanism" . }}
{{- if eq . "OAUTHBEARER" }}
{{- $_ := set $kafka "sasl.oauthbearer.method" $.Values.kafka.sasl.oauthbearer.method }}
{{- with $.Values.kafka.sasl.oauthbearer.tokenEndpointUrl }}
{{- $_ := set $kafka "sasl.oauthbearer.token.endpoint.url" . }}
{{- end }}
{{- with $.Values.kafka.sasl.oauthbearer.scope }}
{{- $_ := set $kafka "sasl.oauthbearer.scope" . }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.kafka.tls.existingSecret }}
{{- with .Values.kafka.tls.caKey }}
{{- $_ := set $kafka "ssl.ca.location" (printf "/etc/rbstream/kafka-tls/%s" .) }}
{{- end }}
{{- if and .Values.kafka.tls.certKey .Values.kafka.tls.keyKey }}
{{- $_ := set $kafka "ssl.certificate.location" (printf "/etc/rbstream/kafka-tls/%s" .Values.kafka.tls.certKey) }}
{{- $_ := set $kafka "ssl.key.location" (printf "/etc/rbstream/kafka-tls/%s" .Values.kafka.tls.keyKey) }}
{{- end }}
{{- end }}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}
{{- $_ := set $kafka "ssl.endpoint.identification.algorithm" .Values.kafka.tls.endpointIdentification }}
{{- end }}
{{- range $key, $value := .Values.kafka.extraOptions }}
{{- $_ := set $kafka $key (toString $value) }}
{{- end }}
{{- toJson $kafka }}
{{- end }}

{{/* Env vars with the Kafka secrets, read from the referenced Secrets (never from values). */}}
{{- define "rbstream.kafkaSecretEnv" -}}
{{- $sasl := .Values.kafka.sasl }}
{{- if and $sasl.mechanism $sasl.existingSecret }}
{{- if eq $sasl.mechanism "OAUTHBEARER" }}
- name: RBSTREAM_KAFKA_SASL_OAUTHBEARER_CLIENT_ID
  valueFrom:
    secretKeyRef: {name: {{ $sasl.existingSecret | quote }}, key: {{ $sasl.oauthbearer.clientIdKey | quote }}}
- name: RBSTREAM_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET
  valueFrom:
    secretKeyRef: {name: {{ $sasl.existingSecret | quote }}, key: {{ $sasl.oauthbearer.clientSecretKey | quote }}}
{{- else }}
- name: RBSTREAM_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ $sasl.existingSecret | quote }}, key: {{ $sasl.usernameKey | quote }}}
- name: RBSTREAM_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $sasl.existingSecret | quote }}, key: {{ $sasl.passwordKey | quote }}}
{{- end }}
{{- end }}
{{- end }}

{{/* Checks of values that would make a broken release. */}}
{{- define "rbstream.validate" -}}
{{- if and .Values.consumer.autoscaling.keda.enabled .Values.consumer.autoscaling.hpa.enabled }}
{{- fail "consumer.autoscaling: enable keda or hpa, not both (KEDA makes its own HPA)" }}
{{- end }}
{{- if gt (int .Values.consumer.replicas) (int .Values.kafka.inputTopicPartitions) }}
{{- fail (printf "consumer.replicas (%d) > kafka.inputTopicPartitions (%d): the extra consumers would sit idle" (int .Values.consumer.replicas) (int .Values.kafka.inputTopicPartitions)) }}
{{- end }}
{{- if and .Values.kafka.sasl.mechanism (not .Values.kafka.sasl.existingSecret) }}
{{- fail "kafka.sasl.mechanism is set: name the Secret with the credentials in kafka.sasl.existingSecret" }}
{{- end }}
{{- if not (has .Values.kafka.sasl.mechanism (list "" "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512" "OAUTHBEARER")) }}
{{- fail (printf "kafka.sasl.mechanism %q: use PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER" .Values.kafka.sasl.mechanism) }}
{{- end }}
{{- if not (has .Values.kafka.securityProtocol (list "PLAINTEXT" "SSL" "SASL_PLAINTEXT" "SASL_SSL")) }}
{{- fail (printf "kafka.securityProtocol %q: use PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL" .Values.kafka.securityProtocol) }}
{{- end }}
{{- end }}
